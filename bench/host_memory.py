"""Peak host memory (RSS) of HF import, HF export and train-start-from-checkpoint vs model size.

For each depth, a random model directory is written (not measured), exported to a HF checkpoint
(measured), imported back (measured), a warm-up run starts from the imported model with
``checkpoint.init_from`` (scan_layers on: the per-layer checkpoint is stacked while it is read)
and takes one step, saving it (measured), and a second run resumes it (measured). Each
measurement is a fresh process. Model: hidden 512, 16 routed experts of width 512, fp32, depth
varied, so the model grows while its largest tensor stays the same (a [16, 512, 512] expert
stack, 16 MiB): streaming means peak RSS stays near a constant plus a few largest tensors for
import and export. Train-start on a CPU host also holds the train state itself (the CPU
device's memory is host memory): "start" is the peak from process start until the state is
built (before the first step), reported as (peak - RSS before the checkpoint is read) / state
bytes; the bound is one copy plus the restore staging (dsa_train.checkpoint.model_io: 256 MiB of
reads in flight, a resume reads a group of at most 256 MiB of arrays at a time) and the largest
array (for init_from into the stacked layout, the largest stacked parameter, converted while it is
read), i.e. never two copies. "run" adds the first step and its checkpoint save.

CPU:  python bench/host_memory.py --depths 4 16 48
Writes bench/results/host_memory.json and host_memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIDTH = ["model.hidden_size=512", "model.intermediate_size=512", "model.moe_intermediate_size=512",
         "model.n_routed_experts=16", "model.n_group=4", "model.topk_group=2", "model.vocab_size=4096",
         "model.first_k_dense_replace=1", "model.param_dtype=float32", "model.compute_dtype=float32"]


def model_config(depth: int):
    sys.path.insert(0, str(REPO))
    from dsa_train.config import load_config

    return load_config(REPO / "configs" / "tiny.yaml", WIDTH + [f"model.num_hidden_layers={depth}"]).model


def write_random_model(config, out: Path) -> int:
    """A model directory of random weights, staged through file-backed memmaps; returns its bytes."""
    import numpy as np

    from dsa_train.checkpoint import model_io
    from dsa_train.convert.hf_import import _abstract_variables

    staging = out.parent / (out.name + ".staging")
    staging.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays, total = {}, 0
    for i, (key, (shape, dtype)) in enumerate(_abstract_variables(config).items()):
        a = np.memmap(staging / f"{i}.bin", dtype=dtype, mode="w+", shape=shape)
        flat = a.reshape(-1)
        for s in range(0, flat.size, 2**22):
            chunk = flat[s:s + 2**22]
            if key.endswith("bias"):
                chunk[...] = 0.0
            elif len(shape) == 1:  # norms
                chunk[...] = 1.0
            else:
                chunk[...] = (0.02 * rng.standard_normal(chunk.size)).astype(dtype)
        a.flush()
        arrays[key] = np.memmap(staging / f"{i}.bin", dtype=dtype, mode="r", shape=shape)
        total += a.nbytes
    out.mkdir(parents=True)
    model_io.save_model_state(out, model_io.nest(arrays), config)
    import shutil

    shutil.rmtree(staging)
    return total


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes (RssAnon, VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _rss_anon() -> int:
    """Anonymous resident memory (bytes): what streaming must bound. ru_maxrss also counts
    file-backed pages of the memmapped staging and safetensors files, which the kernel can drop."""
    return _status("RssAnon")


def _train_overrides(depth: int, run_dir, steps: int, init_from=None) -> list[str]:
    out = WIDTH + [f"model.num_hidden_layers={depth}", "model.scan_layers=true", "train.stage=warmup",
                   f"train.steps={steps}", "train.batch_size=2", "train.seq_len=32", "model.index_topk=8",
                   "data.source=synthetic", f"train.run_dir={run_dir}"]
    return out + ([f"checkpoint.init_from={init_from}"] if init_from else [])


class _StateBuilt(Exception):
    pass


def train_start(overrides: list[str], start_only: bool = False) -> dict:
    """Run the trainer; report peak memory from process start until its state is built
    ("start_*", before the first step) and the RSS right before the checkpoint is read.
    ``start_only``: stop there (no step, no save)."""
    from dsa_train.config import load_config
    from dsa_train.train import trainer

    marks = {}
    resolve, loop = trainer.resolve_start, trainer._loop

    def resolve_start(*a, **k):
        marks["before_read_rss"] = _status("VmRSS")
        marks["before_read_anon"] = _rss_anon()
        return resolve(*a, **k)

    def start_loop(config, console, run_dir, graphdef, state, *rest):
        import jax
        import numpy as np

        marks["start_peak_rss"] = _status("VmHWM")
        marks["start_peak_anon"] = PEAK[0] = max(PEAK[0], _rss_anon())
        marks["state_bytes"] = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))
        if start_only:
            raise _StateBuilt
        return loop(config, console, run_dir, graphdef, state, *rest)

    trainer.resolve_start, trainer._loop = resolve_start, start_loop
    try:
        trainer.train(load_config(REPO / "configs" / "tiny.yaml", overrides), console=False)
    except _StateBuilt:
        pass
    finally:
        trainer.resolve_start, trainer._loop = resolve, loop
    return marks


PEAK = [0]


def child(args) -> None:
    import threading

    done = threading.Event()

    def sample():
        while not done.is_set():
            PEAK[0] = max(PEAK[0], _rss_anon())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.time()
    marks = {}
    if args.child == "export":
        import orbax.checkpoint  # noqa: F401 - the libraries' own memory is not the export's

        from dsa_train.convert import export_hf_checkpoint

        marks["before_read_anon"] = _rss_anon()
        export_hf_checkpoint(args.src, args.dst, dtype="float32", read_budget=args.read_budget)
    elif args.child == "import":
        from dsa_train.convert import import_hf_checkpoint

        import_hf_checkpoint(args.src, args.dst)
    elif args.child == "train":
        marks = train_start(_train_overrides(args.depth, args.dst, 1, init_from=args.src), args.start_only)
    else:  # resume the run "train" wrote (its step 1)
        marks = train_start(_train_overrides(args.depth, args.dst, 2), args.start_only)
    done.set()
    sampler.join()
    print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "peak_anon": max(PEAK[0], _rss_anon()), "seconds": time.time() - start, **marks}))


def measure(what: str, src: Path, dst: Path, depth: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, __file__, "--child", what, "--src", str(src), "--dst", str(dst),
                          "--depth", str(depth)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", type=int, nargs="+", default=[4, 16, 48])
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "host_memory"))
    p.add_argument("--child", choices=("export", "import", "train", "resume"))
    p.add_argument("--src")
    p.add_argument("--dst")
    p.add_argument("--depth", type=int)
    p.add_argument("--start-only", action="store_true",
                   help="with --child train / resume: stop once the state is built")
    p.add_argument("--read-budget", default="2GB", help="with --child export: the exporter's read budget")
    p.add_argument("--workdir", help="scratch directory (default: a temporary one)")
    args = p.parse_args()
    if args.child:
        return child(args)
    rows = []
    for depth in args.depths:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            tmp = Path(tmp)
            config = model_config(depth)
            model_bytes = write_random_model(config, tmp / "model")
            row = {"depth": depth, "model_bytes": model_bytes, "largest_tensor_bytes": 16 * 512 * 512 * 4}
            row["export"] = measure("export", tmp / "model", tmp / "hf", depth)
            row["import"] = measure("import", tmp / "hf", tmp / "imported", depth)
            row["train_start"] = measure("train", tmp / "imported", tmp / "run", depth)
            row["resume"] = measure("resume", tmp / "imported", tmp / "run", depth)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "config": WIDTH}, indent=2))
    mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    lines = ["Peak RSS (ru_maxrss, includes file-backed pages) / peak anonymous RSS (sampled every 5 ms), MiB.",
             "Train-start and resume: peak until the state is built (before the first step); "
             "'/ state' = (peak RSS - RSS before the checkpoint is read) / train-state bytes; "
             "'run' = peak through the first step and its checkpoint save.",
             "", "| depth | model MiB | export | import | init_from start | / state | resume start | / state | "
             "init_from run | resume run |", "|---|---|---|---|---|---|---|---|---|---|"]
    both = lambda m: f"{mib(m['peak_rss'])} / {mib(m['peak_anon'])}"  # noqa: E731
    start = lambda m: f"{mib(m['start_peak_rss'])} / {mib(m['start_peak_anon'])}"  # noqa: E731
    ratio = lambda m: f"{start_ratio(m):.2f}"  # noqa: E731
    for r in rows:
        t, s = r["train_start"], r["resume"]
        lines.append(f"| {r['depth']} | {mib(r['model_bytes'])} | {both(r['export'])} | {both(r['import'])} | "
                     f"{start(t)} | {ratio(t)} | {start(s)} | {ratio(s)} | {both(t)} | {both(s)} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def start_ratio(marks: dict) -> float:
    """(peak RSS until the state is built - RSS before the checkpoint is read) / state bytes."""
    return (marks["start_peak_rss"] - marks["before_read_rss"]) / marks["state_bytes"]


if __name__ == "__main__":
    main()
