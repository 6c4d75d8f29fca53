import os

# Tests run on the CPU; keep XLA from grabbing every core's worth of threads per test process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The deviceless TPU compile tests load libtpu with no TPU attached; without this, a second test
# process (pytest -n, or a plan compile running beside the tests) fails on libtpu's lockfile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
