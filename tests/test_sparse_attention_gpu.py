"""The GPU sparse MLA kernels' split layouts against the reference in interpret mode: the value
columns shared by several programs (forward, dQ and dKV kernels, their chunks visited in rotated
order), several head steps in the dKV kernel, -1 slots, rows with fewer than K candidates, a row
without keys. The default block sizes only split at the real 512 value columns, so they are set here."""

import numpy as np

from dsa_train.kernels.sparse_attention_gpu import sparse_mla_attention_gpu
from dsa_train.ops.attention import NEG_INF
from test_sparse_attention_kernels import assert_matches_reference, make_inputs


def test_value_splits_match_reference():
    # D = 80 = 64 (value: four 16-column chunks) + 16 (rope); H = 20 padded to 32 heads (the
    # dKV kernel walks them in 4 steps of 8); K = 20: two slot blocks of 16, the second partial.
    q, kv, idx = make_inputs(s=8, t=8, h=20, d=80, k=20, seed=4, drop_row=2)
    blocks = dict(chunk_v=16, v_splits=2, v_splits_dq=4, v_splits_dkv=2, block_k=16, block_k_bwd=16,
                  block_h_bwd=8)
    fn = lambda q, kv, idx, scale, v: sparse_mla_attention_gpu(q, kv, idx, scale, v, interpret=True,  # noqa: E731
                                                               **blocks)
    out, lse, _ = assert_matches_reference(fn, q, kv, idx, 0.25, 64)
    assert np.all(np.asarray(out[:, 2]) == 0) and np.all(np.asarray(lse[:, 2]) <= NEG_INF / 2)
