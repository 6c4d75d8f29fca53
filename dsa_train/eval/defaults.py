"""Defaults of `dsa-train eval`, importable without JAX (the command-line parser reads them)."""

# Query-position buckets: [0, 1K), [1K, 8K), [8K, 32K), [32K, inf).
DEFAULT_BUCKET_EDGES = (1024, 8192, 32768)
# Needle depths: 0 = right after the start of the document, 1 = just before the question.
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
# Held-out data: the training streams use seeds (data.seed, train.seed); this one never collides
# with a training seed of the recipes (0 unless changed).
DEFAULT_HELDOUT_SEED = 1_000_003
