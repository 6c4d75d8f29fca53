"""`dsa-train plan --target tpu-...`: the train step compiled for a TPU slice with no TPU attached
(libtpu's deviceless topologies), and the HLO cost walker it reads the compiled program with."""

import json
import re

import pytest

from dsa_train.parallel import hlo_costs, plan_tpu

# A 3-step scan of a 256 x 256 matmul, as XLA prints it (optimized, TPU layouts).
SCAN_HLO = """HloModule jit_g, is_scheduled=true, num_partitions=4

%fused (param_0: bf16[256,256]) -> bf16[256,256] {
  %param_0 = bf16[256,256]{1,0:T(8,128)(2,1)} parameter(0)
  ROOT %convolution.3 = bf16[256,256]{1,0:T(8,128)(2,1)} convolution(%param_0, %param_0), dim_labels=bf_io->bf
}

%body (arg: (s32[], bf16[256,256])) -> (s32[], bf16[256,256]) {
  %constant.1 = s32[]{:T(128)} constant(1)
  %arg = (s32[]{:T(128)}, bf16[256,256]{1,0:T(8,128)(2,1)}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%arg), index=0
  %add = s32[]{:T(128)} add(%i, %constant.1)
  %x = bf16[256,256]{1,0:T(8,128)(2,1)} get-tuple-element(%arg), index=1
  %mm = bf16[256,256]{1,0:T(8,128)(2,1)} fusion(%x), kind=kOutput, calls=%fused
  %ar = bf16[256,256]{1,0:T(8,128)(2,1)} all-reduce(%mm), replica_groups={{0,1},{2,3}}, to_apply=%fused
  ROOT %t = (s32[]{:T(128)}, bf16[256,256]{1,0:T(8,128)(2,1)}) tuple(%add, %ar)
}

%cond (arg.1: (s32[], bf16[256,256])) -> pred[] {
  %constant.3 = s32[]{:T(128)} constant(3)
  %arg.1 = (s32[]{:T(128)}, bf16[256,256]{1,0:T(8,128)(2,1)}) parameter(0)
  %j = s32[]{:T(128)} get-tuple-element(%arg.1), index=0
  ROOT %lt = pred[]{:T(512)} compare(%j, %constant.3), direction=LT
}

ENTRY %main (x.1: bf16[256,256]) -> bf16[256,256] {
  %x.1 = bf16[256,256]{1,0:T(8,128)(2,1)} parameter(0)
  %c0 = s32[]{:T(128)} constant(0)
  %tuple = (s32[]{:T(128)}, bf16[256,256]{1,0:T(8,128)(2,1)}) tuple(%c0, %x.1)
  %while = (s32[]{:T(128)}, bf16[256,256]{1,0:T(8,128)(2,1)}) while(%tuple), condition=%cond, body=%body
  %lse = f32[256,1]{1,0:T(8,128)} fusion(%x.1), kind=kLoop, calls=%fused
  ROOT %out = bf16[256,256]{1,0:T(8,128)(2,1)} get-tuple-element(%while), index=1
}
"""


def test_walker_counts_loops_collectives_and_padding():
    c = hlo_costs.program_costs(SCAN_HLO)
    assert c["loops"] == [(3, "body")]
    once = hlo_costs.program_costs(SCAN_HLO, count_loops=False)
    mm = 2 * 256 ** 3
    # The matmul in the loop 3 times, plus the one outside (its f32[256, 1] output is padded to
    # [256, 128] by the T(8,128) tile: 128 KiB, not 1 KiB).
    assert c["flops"] == 4 * mm and once["flops"] == 2 * mm
    array = 256 * 256 * 2
    # Per iteration: the fusion and the all-reduce each read and write one array, the counter add
    # 3 scalars; the condition (run 4 times) compares two scalars into a pred.
    assert c["bytes_accessed"] == 3 * (4 * array + 12) + 4 * 9 + array + 256 * 128 * 4
    ar = c["collectives"]["all-reduce"]
    assert ar["count"] == 3 and ar["operand_bytes"] == 3 * array and ar["wire_bytes"] == 3 * 2 * array / 2
    plus = hlo_costs.Program(SCAN_HLO, trip_extra={3: 1}).costs()
    assert plus.flops - c["flops"] == mm  # the marginal cost of one more iteration


def test_target_parsing():
    chip, topo = plan_tpu.parse_target("tpu-v5p", 256)
    assert chip.name == "TPU v5p" and topo == "v5p:4x8x8"
    assert plan_tpu.parse_target("tpu-v6e:4x4", 16)[1] == "v6e:4x4"
    with pytest.raises(ValueError, match="chips"):
        plan_tpu.parse_target("tpu-v5p:2x2x1", 8)
    with pytest.raises(ValueError, match="expected"):
        plan_tpu.parse_target("tpu-v7", 8)


def _libtpu_topology():
    try:
        plan_tpu.topology_devices("v5p:2x2x1")
    except ValueError as e:
        pytest.skip(f"no deviceless TPU compile here: {e}")


@pytest.mark.slow
def test_plan_target_compiles_both_stages_for_v5p(capsys):
    """The tiny model's warm-up and sparse steps, context parallel, compiled for a v5p 2x2x1
    slice: memory, FLOPs, bytes and collectives read from the compiled program, per layer too."""
    _libtpu_topology()
    from dsa_train.parallel.plan import plan_main

    report = plan_main(["configs/tiny.yaml", "--target", "tpu-v5p:2x2x1", "--mesh", "data=1,fsdp=2,context=2",
                        "--batch", "2", "--seq-len", "512", "--depth-cut", "2+2", "--json",
                        "--set", "model.index_topk=64", "--set", "model.compute_dtype=bfloat16",
                        "--set", "model.scan_layers=true", "--set", "model.num_hidden_layers=5",
                        "--set", "model.first_k_dense_replace=2"])
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["stage"] for r in results] == ["warmup", "sparse"]
    for r in results:
        mem, w = r["memory"], r["walked"]
        assert mem["argument"] > 0 and mem["temp"] > 0 and mem["peak"] < plan_tpu.TPU_CHIPS["v5p"].hbm
        # Loops whose trip count depends on the data (the flash kernels' causal key-block skipping)
        # count at the causal mean of their clipped bound; any left unreadable are reported, not hidden.
        assert w["flops"] > 0 and w["bytes_accessed"] > 0 and isinstance(r["unknown_trip_counts"], list)
        if r["stage"] == "warmup":
            assert r["dynamic_loops"] and all(bound >= 1 for bound, _ in r["dynamic_loops"])
        # fsdp gathers weights, context parallelism gathers keys: both show in the program.
        assert w["collectives"]["all-gather"]["count"] > 0 and w["wire_bytes"] > 0
        # Both stacks scanned (2 layers each): per-layer costs, and the 2+2 cut extrapolates to 2+3.
        assert set(r["per_layer"]) == {"dense", "moe"} and r["per_layer"]["moe"]["flops"] > 0
        assert r["full_stacks"] == {"dense": 2, "moe": 3}
        assert r["full_depth"]["flops"] == pytest.approx(w["flops"] + r["per_layer"]["moe"]["flops"])
        # The walker counts loops in full: at least XLA's loop-once matmul FLOPs, within 2x of them
        # once the loops are taken out (XLA adds elementwise FLOPs).
        xla = r["xla_cost_analysis"]["flops"]
        assert xla > 0 and w["flops"] >= 0.5 * xla
        t = r["time"]
        assert 0 < t["lower_s"] <= t["upper_s"]
    assert re.search(r"stage warmup: compiled for TPU v5p v5p:2x2x1", report)
    assert "Assumptions left" in report and "Extrapolated to 2 dense, 3 moe layers" in report


def test_bad_target_is_one_line_error(capsys):
    from dsa_train.cli import main

    assert main(["plan", "configs/tiny.yaml", "--target", "tpu-v7", "--mesh", "data=1,fsdp=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--target 'tpu-v7'" in err[0]



def _causal_loop_program() -> str:
    """A loop whose trip count is data-dependent and clipped to 8 (the causal key-block skip's
    form) with a 64 x 64 matmul per iteration, and one more matmul outside it."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def f(x, n, y):
        out = lax.fori_loop(0, jnp.clip(n // 2 + 1, 0, 8), lambda i, acc: acc + jnp.tanh(acc @ x), x)
        return out, y @ y

    return jax.jit(f).lower(jnp.ones((64, 64)), 3, jnp.ones((32, 32))).compile().as_text()


def test_walker_counts_data_dependent_loops_at_the_causal_mean():
    text = _causal_loop_program()
    mm, outside = 2 * 64 ** 3, 2 * 32 ** 3
    once = hlo_costs.Program(text)
    assert once.costs().flops == mm + outside and len(once.unknown_trip_counts) == 1
    causal = hlo_costs.Program(text, causal_loops=True)
    assert causal.costs().flops == 4.5 * mm + outside  # (8 + 1) / 2 iterations
    assert [b for b, _ in causal.dynamic_loops] == [8] and not causal.unknown_trip_counts


def test_walker_reads_limits_a_scan_stacked_before_the_loops():
    """The kernels' form: per-block limits computed (clipped) by a scan, read one per query block
    by an outer loop, each the trip count of the inner key-block loop."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def f(x, pos):
        _, limits = lax.scan(lambda c, p: (c, jnp.clip(p // 2 + 1, 0, 8)), 0, pos)
        return lax.fori_loop(0, 4, lambda j, acc: lax.fori_loop(0, limits[j], lambda i, a: a + jnp.tanh(a @ x), acc), x)

    text = jax.jit(f).lower(jnp.ones((64, 64)), jnp.arange(4)).compile().as_text()
    prog = hlo_costs.Program(text, causal_loops=True)
    assert prog.costs().flops == 4 * 4.5 * 2 * 64 ** 3
    assert [b for b, _ in prog.dynamic_loops] == [8] and not prog.unknown_trip_counts


# Two matmuls, as a TPU module prints their call stacks: frame 3 (kernel.py, called from model.py)
# and frame 2 (model.py); the fused dot has no frame of its own and takes its fusion's.
SOURCE_HLO = """HloModule jit_g, is_scheduled=true

FileNames
1 "/src/model.py"
2 "/src/kernel.py"

FunctionNames
1 "layer"
2 "kernel"

FileLocations
1 {file_name_id=1 function_name_id=1 line=10 end_line=10 column=1 end_column=1}
2 {file_name_id=2 function_name_id=2 line=20 end_line=20 column=1 end_column=1}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}

%fused (param_0: bf16[256,256]) -> bf16[256,256] {
  %param_0 = bf16[256,256]{1,0} parameter(0)
  ROOT %convolution.3 = bf16[256,256]{1,0} convolution(%param_0, %param_0), dim_labels=bf_io->bf
}

ENTRY %main (x.1: bf16[256,256]) -> (bf16[256,256], bf16[256,256]) {
  %x.1 = bf16[256,256]{1,0} parameter(0)
  %k = bf16[256,256]{1,0} fusion(%x.1), kind=kOutput, calls=%fused, metadata={op_name="a" stack_frame_id=2}
  %m = bf16[256,256]{1,0} dot(%x.1, %x.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="b" stack_frame_id=1}
  ROOT %t = (bf16[256,256]{1,0}, bf16[256,256]{1,0}) tuple(%k, %m)
}
"""


def test_walker_charges_one_source_file():
    frames = hlo_costs.stack_frame_files(SOURCE_HLO)
    assert frames == {1: ["/src/model.py"], 2: ["/src/kernel.py", "/src/model.py"]}
    mm, array = 2 * 256 ** 3, 256 * 256 * 2
    kernel = hlo_costs.program_costs(SOURCE_HLO, source="kernel.py")
    assert kernel["flops"] == mm and kernel["bytes_accessed"] == 2 * array
    assert hlo_costs.program_costs(SOURCE_HLO, source="model.py")["flops"] == 2 * mm
    assert hlo_costs.program_costs(SOURCE_HLO, source="other.py")["flops"] == 0


# A fusion that reads 8 rows of a 1024-row operand through a nested fusion's dynamic-slice (the
# form XLA gives a key block taken from the gathered keys inside the score fusion).
NESTED_SLICE_HLO = """HloModule jit_h, is_scheduled=true

%inner (p0: bf16[1024,256], p1: s32[]) -> bf16[8,256] {
  %p0 = bf16[1024,256]{1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %c0 = s32[] constant(0)
  ROOT %ds = bf16[8,256]{1,0} dynamic-slice(%p0, %p1, %c0), dynamic_slice_sizes={8,256}
}

%outer (q0: bf16[1024,256], q1: s32[]) -> bf16[8,256] {
  %q0 = bf16[1024,256]{1,0} parameter(0)
  %q1 = s32[] parameter(1)
  %f = bf16[8,256]{1,0} fusion(%q0, %q1), kind=kLoop, calls=%inner
  ROOT %n = bf16[8,256]{1,0} negate(%f)
}

ENTRY %main (x: bf16[1024,256], i: s32[]) -> bf16[8,256] {
  %x = bf16[1024,256]{1,0} parameter(0)
  %i = s32[] parameter(1)
  ROOT %o = bf16[8,256]{1,0} fusion(%x, %i), kind=kLoop, calls=%outer
}
"""


def test_walker_counts_a_slice_taken_in_a_nested_fusion_as_the_slice():
    block = 8 * 256 * 2
    assert hlo_costs.program_costs(NESTED_SLICE_HLO)["bytes_accessed"] == block + 4 + block  # read, index, write
