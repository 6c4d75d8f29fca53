"""Peak host memory (RSS) of HF import, HF export and train-start-from-checkpoint vs model size.

For each depth, a random model directory is written (not measured), exported to a HF checkpoint
(measured), imported back (measured), and a warm-up run starts from the imported model with
``checkpoint.init_from`` and takes one step (measured). Each measurement is a fresh process
reporting its own ``ru_maxrss``. Model: hidden 512, 16 routed experts of width 512, fp32,
depth varied, so the model grows while its largest tensor stays the same (a [16, 512, 512]
expert stack, 16 MiB): streaming means peak RSS stays near a constant plus a few largest
tensors for import and export. Train-start on a CPU host also holds the train state itself
(the CPU device's memory is host memory): the bound there is one model copy plus the warm-up's
indexer optimizer state and a constant, i.e. never two copies.

CPU:  python bench/host_memory.py --depths 2 5 10
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


def _rss_anon() -> int:
    """Anonymous resident memory (bytes): what streaming must bound. ru_maxrss also counts
    file-backed pages of the memmapped staging and safetensors files, which the kernel can drop."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def child(args) -> None:
    import threading

    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.time()
    if args.child == "export":
        from dsa_train.convert import export_hf_checkpoint

        export_hf_checkpoint(args.src, args.dst, dtype="float32")
    elif args.child == "import":
        from dsa_train.convert import import_hf_checkpoint

        import_hf_checkpoint(args.src, args.dst)
    else:
        from dsa_train.config import load_config
        from dsa_train.train.trainer import train

        overrides = WIDTH + [f"model.num_hidden_layers={args.depth}", "model.scan_layers=true",
                             "train.stage=warmup", "train.steps=1", "train.batch_size=2", "train.seq_len=32",
                             "data.source=synthetic", f"train.run_dir={args.dst}", f"checkpoint.init_from={args.src}"]
        train(load_config(REPO / "configs" / "tiny.yaml", overrides), console=False)
    done.set()
    sampler.join()
    print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "peak_anon": max(peak[0], _rss_anon()), "seconds": time.time() - start}))


def measure(what: str, src: Path, dst: Path, depth: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, __file__, "--child", what, "--src", str(src), "--dst", str(dst),
                          "--depth", str(depth)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", type=int, nargs="+", default=[2, 5, 10])
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "host_memory"))
    p.add_argument("--child", choices=("export", "import", "train"))
    p.add_argument("--src")
    p.add_argument("--dst")
    p.add_argument("--depth", type=int)
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
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "config": WIDTH}, indent=2))
    mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    lines = ["Peak RSS (ru_maxrss, includes file-backed pages) / peak anonymous RSS (sampled every 5 ms), MiB.",
             "", "| depth | model MiB | export | import | train-start | train-start anon / model |",
             "|---|---|---|---|---|---|"]
    both = lambda m: f"{mib(m['peak_rss'])} / {mib(m['peak_anon'])}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['depth']} | {mib(r['model_bytes'])} | {both(r['export'])} | {both(r['import'])} | "
                     f"{both(r['train_start'])} | {r['train_start']['peak_anon'] / r['model_bytes']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
