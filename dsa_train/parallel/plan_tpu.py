"""``dsa-train plan --target tpu-v5p:...``: the real train step compiled ahead of time for a TPU
slice that is not attached (libtpu's deviceless topologies), and a step time built from what XLA
compiled.

What it measures, per chip (the compiled program is the per-device SPMD program):
- memory: ``compiled.memory_analysis()`` (arguments, outputs, temporaries, generated code) against
  the chip's HBM;
- FLOPs, HBM bytes accessed and the collectives' bytes from the optimized HLO, every loop counted
  as often as it runs (``dsa_train.parallel.hlo_costs``; XLA's own ``cost_analysis()``, which counts
  a loop body once, is printed next to it);
- per layer: the marginal cost of one more layer of each scanned stack (the same program walked
  with that stack's loops run once more), so that a depth cut extrapolates to the full depth.

Step time from those costs and the chip's constants (``TPU_CHIPS``, with their sources):
compute = FLOPs / peak bf16, memory = bytes / HBM bandwidth, communication = collective wire bytes
/ the ICI bandwidth of one torus axis. Lower bound: the three overlap perfectly (max); upper bound:
none overlaps (sum). Every assumption is printed with the figures.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Chip:
    name: str
    generation: str  # topology prefix for get_topology_desc
    hbm: float  # bytes
    peak_bf16: float  # FLOP/s, dense
    hbm_bw: float  # bytes/s
    ici_link_bw: float  # bytes/s per link, one direction
    torus_dims: int  # 3 (v5p) or 2 (v6e)
    source: str


TPU_CHIPS = {
    # cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GB HBM2e at 2,765 GB/s, ICI 4,800 Gb/s
    # per chip = 600 GB/s over 6 links (3D torus), taken as 50 GB/s per link and direction.
    "v5p": Chip("TPU v5p", "v5p", 95 * GB, 459e12, 2765e9, 4800e9 / 8 / 6 / 2, 3,
                "cloud.google.com/tpu/docs/v5p"),
    # cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GB HBM at 1,640 GB/s, ICI 3,584 Gb/s per
    # chip = 448 GB/s over 4 links (2D torus), taken as 56 GB/s per link and direction.
    "v6e": Chip("TPU v6e", "v6e", 32 * GB, 918e12, 1640e9, 3584e9 / 8 / 4 / 2, 2,
                "cloud.google.com/tpu/docs/v6e"),
}
HEADROOM = 0.9  # of HBM usable by the program (runtime, fragmentation); the same as the GPU plan's


def parse_target(text: str, n_devices: int) -> tuple[Chip, str]:
    """``tpu-v5p:8x8x4`` / ``tpu-v6e:16x16``, or ``tpu-v5p`` (a slice shape chosen for the mesh size)."""
    m = re.fullmatch(r"tpu-(v5p|v6e)(?::(\d+(?:x\d+){1,2}))?", text)
    if not m:
        raise ValueError(f"--target {text!r}: expected tpu-v5p[:AxBxC] or tpu-v6e[:AxB]")
    chip = TPU_CHIPS[m.group(1)]
    shape = m.group(2) or default_shape(n_devices, chip.torus_dims)
    dims = [int(d) for d in shape.split("x")]
    if len(dims) != chip.torus_dims:
        raise ValueError(f"--target {text!r}: a {chip.name} slice has {chip.torus_dims} dimensions")
    if math.prod(dims) != n_devices:
        raise ValueError(f"--target {text!r}: the slice has {math.prod(dims)} chips, the mesh {n_devices}")
    return chip, f"{chip.generation}:{shape}"


def default_shape(n: int, dims: int) -> str:
    """The most cube-like power-of-two slice of n chips (n a power of two)."""
    if n & (n - 1):
        raise ValueError(f"a TPU slice shape for {n} chips: pass --target tpu-...:AxBxC")
    e = n.bit_length() - 1
    parts = [e // dims + (1 if i < e % dims else 0) for i in range(dims)]
    return "x".join(str(1 << p) for p in sorted(parts))


def topology_devices(topology: str):
    """The devices of a TPU slice, no TPU attached (needs libtpu)."""
    # Deviceless compiles take no TPU: let several processes load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies

        return topologies.get_topology_desc(topology, "tpu").devices
    except Exception as e:  # libtpu missing or the topology unknown to it
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"TPU topology {topology!r} unavailable ({first}); install libtpu "
                         "(pip install 'dsa-train[tpu]')") from None


def slice_mesh(mesh_config, devices):
    """The trainer's mesh layout (``parallel.mesh.make_mesh``) over a slice's devices. The trainer's
    multi-host check (each process's devices hold whole row groups or one part of one) is reported,
    not enforced: a plan may explore meshes the trainer's data feeding does not support."""
    import numpy as np
    from jax.sharding import Mesh

    from dsa_train.parallel.mesh import MeshError, data_shards, mesh_shape, process_grid
    from dsa_train.parallel.rules import MESH_AXES

    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    sizes = mesh_shape(mesh_config, len(devices))
    grid = np.array(devices, dtype=object).reshape([sizes[a] for a in MESH_AXES])
    note = None
    try:
        data_shards(process_grid(Mesh(grid, MESH_AXES)))
    except MeshError as e:
        note = f"`dsa-train train` refuses this mesh: {e}"
    return Mesh(grid, MESH_AXES), note


def layer_stacks(model_config) -> dict[str, int]:
    """Scanned stacks and their lengths (model.scan_layers: dense layers, then MoE layers)."""
    if not model_config.scan_layers:
        return {}
    n, k = model_config.num_hidden_layers, min(model_config.first_k_dense_replace, model_config.num_hidden_layers)
    stacks = {"dense": k, "moe": n - k} if model_config.has_moe else {"dense": n}
    return {name: size for name, size in stacks.items() if size > 0}


def compile_step(config, mesh, rules):
    """Lower + compile the sharded train step from abstract arrays (nothing is allocated)."""
    from dsa_train.parallel.plan import abstract_train_step
    from dsa_train.parallel.scope import activate

    t = config.train
    step, abstract, batch = abstract_train_step(config, mesh, rules)
    start = time.perf_counter()
    with activate(mesh, rules, remat=t.remat, expert_capacity=config.mesh.expert_capacity):
        lowered = step.lower(abstract, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return compiled, {"lower_s": lowered_at - start, "compile_s": time.perf_counter() - lowered_at}


def measure(compiled, stacks: dict[str, int]) -> dict:
    """Memory, XLA's cost analysis, the walked costs and the per-layer marginal costs."""
    ma = compiled.memory_analysis()
    memory = {"argument": ma.argument_size_in_bytes, "output": ma.output_size_in_bytes,
              "alias": ma.alias_size_in_bytes, "temp": ma.temp_size_in_bytes,
              "code": ma.generated_code_size_in_bytes}
    memory["peak"] = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"] + memory["code"]
    xla = {}
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        xla = {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0))}
    except Exception:  # cost analysis is backend-dependent
        pass
    return {"memory": memory, "xla_cost_analysis": xla, **walk(compiled.as_text(), stacks)}


def walk(text: str, stacks: dict[str, int]) -> dict:
    """The walked costs of an optimized module (``compiled.as_text()``, or the same module as XLA
    dumps it) and the per-layer marginal costs of its scanned stacks."""
    from dsa_train.parallel.hlo_costs import Program

    prog = Program(text, causal_loops=True)
    total = prog.costs()
    trips = [t for t, _ in prog.loops]
    per_layer, ambiguous = {}, []
    for name, size in stacks.items():
        if size not in trips:
            continue  # the stack's loop was unrolled (a stack of one) or is not a loop
        plus = Program(text, trip_extra={size: 1}, causal_loops=True).costs()
        # A loop is told from the layer stacks by its trip count only: an inner loop with the
        # same count would be counted in (the loops are listed in the report).
        per_layer[name] = {"layers": size, "flops": plus.flops - total.flops, "bytes_accessed": plus.bytes - total.bytes,
                           "wire_bytes": plus.wire_bytes - total.wire_bytes,
                           "collectives": {k: {q: plus.collectives[k][q] - total.collectives.get(k, {}).get(q, 0.0)
                                               for q in v} for k, v in plus.collectives.items()}}
        if list(stacks.values()).count(size) > 1:
            ambiguous.append(name)
    return {"walked": {"flops": total.flops, "bytes_accessed": total.bytes, "wire_bytes": total.wire_bytes,
                       "collectives": total.collectives},
            "per_layer": per_layer, "ambiguous_layers": ambiguous, "loops": sorted(set(prog.loops)),
            "unknown_trip_counts": prog.unknown_trip_counts, "dynamic_loops": sorted(set(prog.dynamic_loops))}


def step_time(walked: dict, chip: Chip) -> dict:
    compute = walked["flops"] / chip.peak_bf16
    memory = walked["bytes_accessed"] / chip.hbm_bw
    comm = walked["wire_bytes"] / ici_axis_bw(chip)
    return {"compute_s": compute, "memory_s": memory, "comm_s": comm,
            "lower_s": max(compute, memory, comm), "upper_s": compute + memory + comm}


def ici_axis_bw(chip: Chip) -> float:
    """Bandwidth a ring over one torus axis gets per chip: its two links, one direction each."""
    return 2 * chip.ici_link_bw


def extrapolate(measured: dict, stacks: dict[str, int], full: dict[str, int]) -> dict | None:
    """Walked totals at the full depth: the compiled totals plus (full - compiled) layers of each
    stack at its per-layer marginal cost. None if a stack's per-layer cost is unknown."""
    out = {k: measured["walked"][k] for k in ("flops", "bytes_accessed", "wire_bytes")}
    for name, n_full in full.items():
        extra = n_full - stacks.get(name, 0)
        if extra == 0:
            continue
        layer = measured["per_layer"].get(name)
        if layer is None:
            return None
        for k in out:
            out[k] += extra * layer[k]
    return out


def plan_tpu_stage(cfg, rules, chip: Chip, topology: str, full_stacks: dict[str, int], full_config=None) -> dict:
    """Compile ``cfg``'s train step for the slice and measure it; ``full_stacks``: the layer stacks
    of the model the figures are extrapolated to (the recipe's depth), ``full_config`` its config."""
    mesh, note = slice_mesh(cfg.mesh, topology_devices(topology))
    stacks = layer_stacks(cfg.model)
    compiled, timing = compile_step(cfg, mesh, rules)
    m = measure(compiled, stacks)
    m.update(timing)
    m["mesh_note"] = note
    m["stacks"] = stacks
    m["full_stacks"] = full_stacks
    add_step_times(m, chip)
    m["fits"] = m["memory"]["peak"] <= HEADROOM * chip.hbm
    if full_config is not None and full_stacks != stacks:
        m["full_memory"] = extrapolate_memory(m["memory"]["peak"], cfg, full_config, mesh, rules)
        m["fits"] = m["full_memory"]["peak"] <= HEADROOM * chip.hbm
    return m


def add_step_times(m: dict, chip: Chip) -> None:
    """Step time on the compiled depth, and the walked totals and step time at the full depth."""
    stacks, full_stacks = m["stacks"], m["full_stacks"]
    m["time"] = step_time(m["walked"], chip)
    full = extrapolate(m, stacks, full_stacks) if full_stacks != stacks else dict(
        (k, m["walked"][k]) for k in ("flops", "bytes_accessed", "wire_bytes"))
    m["full_depth"] = full
    m["full_time"] = step_time(full, chip) if full else None


def extrapolate_memory(peak: float, cut_cfg, full_cfg, mesh, rules) -> dict:
    """Per-chip peak at the full depth: the compiled peak, plus the exact difference of parameters
    and optimizer state (abstract train states of both depths, sharded), plus what ``remat: full``
    keeps per extra layer (``plan.remat_kept_per_layer``: its input, the sparse stage's top-k indices,
    the warm-up's dense-KL residuals)."""
    from dsa_train.parallel.plan import local_sizes, remat_kept_per_layer, state_memory

    cut, full = state_memory(cut_cfg, mesh, rules), state_memory(full_cfg, mesh, rules)
    state = (full["params"] + full["optimizer"] + full["grads"]) - (cut["params"] + cut["optimizer"] + cut["grads"])
    loc = local_sizes(full_cfg, mesh, rules, full_cfg.train.batch_size, full_cfg.train.seq_len)
    extra_layers = full_cfg.model.num_hidden_layers - cut_cfg.model.num_hidden_layers
    saved = extra_layers * remat_kept_per_layer(full_cfg.model, loc, full_cfg.train.stage)
    return {"peak": peak + state + saved, "state_difference": state, "saved_inputs": saved}


def _gb(x: float) -> str:
    return f"{x / GB:.2f} GB"


def _tb(x: float) -> str:
    return f"{x / 1e12:.3f} TB"


def format_tpu_stage(stage: str, cfg, chip: Chip, topology: str, m: dict) -> list[str]:
    mem, w, tm = m["memory"], m["walked"], m["time"]
    stacks = ", ".join(f"{n} {k}" for k, n in m["stacks"].items()) or "not scanned"
    lines = [f"## stage {stage}: compiled for {chip.name} {topology} ({cfg.train.batch_size} x "
             f"{cfg.train.seq_len:,} tokens, remat {cfg.train.remat}, layers {stacks}"
             + (f", {cfg.model.num_nextn_predict_layers} MTP" if cfg.model.num_nextn_predict_layers else "") + ")",
             "", f"lowered in {m['lower_s']:.0f} s, compiled in {m['compile_s']:.0f} s.", ""]
    if m["mesh_note"]:
        lines += [f"Note: {m['mesh_note']}.", ""]
    lines += ["| per chip (XLA memory_analysis) | |", "|---|---:|",
              f"| arguments (parameters, optimizer state, batch) | {_gb(mem['argument'])} |",
              f"| outputs (aliased with the arguments: {_gb(mem['alias'])}) | {_gb(mem['output'])} |",
              f"| temporaries | {_gb(mem['temp'])} |", f"| generated code | {_gb(mem['code'])} |",
              f"| **peak** | **{_gb(mem['peak'])}** |", "",
              f"{'fits' if m['fits'] else 'DOES NOT FIT'} in {HEADROOM:.0%} of {chip.hbm / GB:.0f} GB.", ""]
    lines += ["| per chip, one step | compiled program | " + " | ".join(f"one {k} layer" for k in m["per_layer"]) + " |",
              "|---|---:|" + "---:|" * len(m["per_layer"])]

    def row(label, key, fmt):
        return f"| {label} | {fmt(w[key])} | " + " | ".join(fmt(v[key]) for v in m["per_layer"].values()) + " |"

    lines += [row("matmul FLOPs", "flops", lambda x: f"{x:.4g}"),
              row("HBM bytes accessed", "bytes_accessed", _tb),
              row("collective bytes on the wire", "wire_bytes", lambda x: f"{x / GB:.2f} GB")]
    for kind in sorted(w["collectives"]):
        c = w["collectives"][kind]
        per = " | ".join(f"{v['collectives'].get(kind, {}).get('operand_bytes', 0.0) / GB:.2f} GB"
                         for v in m["per_layer"].values())
        lines.append(f"| {kind}: {c['count']:.0f} ops, operand bytes | {c['operand_bytes'] / GB:.2f} GB | {per} |")
    lines.append("")
    if m["xla_cost_analysis"]:
        x = m["xla_cost_analysis"]
        lines += [f"XLA cost_analysis() (loop bodies counted once, elementwise FLOPs included): {x['flops']:.4g} "
                  f"FLOPs, {_tb(x['bytes_accessed'])} accessed.", ""]
    lines.append(f"Step time on the compiled depth: compute {tm['compute_s']:.2f} s, HBM {tm['memory_s']:.2f} s, "
                 f"ICI {tm['comm_s']:.2f} s -> {tm['lower_s']:.2f} s (all overlapped) to {tm['upper_s']:.2f} s "
                 "(none overlapped).")
    if m["full_stacks"] != m["stacks"]:
        fs = ", ".join(f"{n} {k}" for k, n in m["full_stacks"].items())
        if m.get("full_memory"):
            fm = m["full_memory"]
            lines.append(f"Per-chip peak extrapolated to {fs} layers: {_gb(fm['peak'])} (compiled peak + "
                         f"{_gb(fm['state_difference'])} more parameters / optimizer state / gradients, exact, + "
                         f"{_gb(fm['saved_inputs'])} that remat keeps for the extra layers): "
                         f"{'fits' if m['fits'] else 'DOES NOT FIT'} in {HEADROOM:.0%} of {chip.hbm / GB:.0f} GB.")
        if m["full_time"]:
            f, ft = m["full_depth"], m["full_time"]
            lines.append(f"Extrapolated to {fs} layers (+ per-layer marginal costs above): {f['flops']:.4g} FLOPs, "
                         f"{_tb(f['bytes_accessed'])} accessed, {f['wire_bytes'] / GB:.1f} GB on the wire per chip; "
                         f"step time {ft['lower_s']:.2f} s to {ft['upper_s']:.2f} s.")
        else:
            lines.append(f"No extrapolation to {fs} layers: a stack's per-layer cost is unknown (its loop was "
                         "unrolled: compile at least 2 layers per stack).")
    if m["ambiguous_layers"]:
        lines.append("Per-layer figures of " + ", ".join(m["ambiguous_layers"]) + " are ambiguous: the stacks "
                     "have the same length (compile a depth cut with different stack lengths).")
    if m.get("dynamic_loops"):
        bounds = ", ".join(str(b) for b in sorted({b for b, _ in m["dynamic_loops"]}))
        lines.append(f"{len(m['dynamic_loops'])} data-dependent loop(s) (causal key-block skipping; static bounds "
                     f"{bounds}) counted at (bound + 1) / 2 iterations.")
        if cfg.mesh.context > 1 and cfg.mesh.context_order == "contiguous":
            lines.append("With mesh.context_order contiguous that is the mean context shard: the last one runs "
                         "about twice the causal work (--set mesh.context_order=zigzag balances it).")
    if m["unknown_trip_counts"]:
        lines.append(f"{len(m['unknown_trip_counts'])} loop(s) with unreadable trip counts counted once.")
    lines.append("")
    return lines


def assumptions(chip: Chip) -> list[str]:
    return [
        f"Chip constants ({chip.source}): {chip.peak_bf16 / 1e12:.0f} TFLOP/s bf16, {chip.hbm / GB:.0f} GB HBM at "
        f"{chip.hbm_bw / 1e9:,.0f} GB/s, ICI {chip.ici_link_bw / 1e9:.0f} GB/s per link and direction.",
        "Assumptions left: every matmul FLOP runs at peak bf16 and every byte XLA's program moves runs at peak HBM "
        "bandwidth (no efficiency factor); elementwise work is counted in bytes, not FLOPs; each collective is a "
        f"ring over one torus axis ({ici_axis_bw(chip) / 1e9:.0f} GB/s per chip: two links, one direction each) "
        "with (g-1)/g of the buffer crossing it (twice for all-reduce); a Pallas kernel moves at least its operands "
        "and outputs (or the bytes it declares); a loop's trip count is the bound of its condition, a data-dependent "
        "loop whose limit is clipped to a constant N (the causal skip of key blocks past a query block) runs "
        "(N + 1) / 2 times, the mean over a causal row's query blocks (context shards hold balanced zig-zag "
        "chunks); the lower bound "
        f"overlaps compute, HBM and ICI perfectly, the upper bound not at all; {HEADROOM:.0%} of HBM is usable.",
    ]
