"""Per-device costs of a compiled XLA program, read from its optimized HLO text
(``compiled.as_text()``): matmul FLOPs, HBM bytes accessed and the collectives' bytes, with every
loop counted as often as it runs.

Why not ``compiled.cost_analysis()`` alone: XLA's cost analysis counts the body of a ``while``
once, whatever its trip count (checked on TPU: a 4-step ``lax.scan`` of a matmul reports the FLOPs
of one step), and the train step is loops inside loops (scanned layer stacks, micro-batches,
blocked attention). This module walks the program instead:

- a ``while`` costs ``trip_count x (body + condition)``; the trip count comes from XLA's
  ``known_trip_count`` or, failing that, from the loop condition's ``compare(i, constant N)``
  (induction variables start at 0 in the loops JAX emits); a loop whose count cannot be read
  counts once and is listed in ``unknown_trip_counts``;
- a data-dependent loop (``compare(i, n)``, n computed at run time, as the causal key-block skip
  ``n = clip(last_position // block + 1, 0, N)`` of the dense kernels is): with ``causal_loops``,
  where the limit's static bound N can be read (a ``minimum`` with a constant), it counts
  ``(N + 1) / 2`` times, the mean over the query blocks of a causal row (listed in
  ``dynamic_loops``); otherwise once, as an unknown trip count;
- a ``conditional`` costs its most expensive branch; fusions, calls and async wrappers cost what
  they call;
- FLOPs: ``2 x output elements x contracted size`` of every ``dot`` / ``convolution`` (elementwise
  work is left out: the step-time model charges it to HBM bytes), plus the ``cost_estimate`` a
  Pallas kernel declares (``tpu_custom_call``);
- bytes accessed: what every top-level instruction reads and writes at its boundary (a fusion's
  operands and outputs, not its insides), as XLA's cost analysis counts them: operands that a fusion
  only slices (itself or in a nested fusion) count as the slices, an in-place
  ``dynamic-update-slice`` as the update; a Pallas kernel counts its declared ``bytes_accessed``
  (at least its operands and outputs);
- ``source``: only the instructions whose stack frames (the module's ``StackFrames`` table) pass
  through a file of that name are charged: the cost of one module's code in the compiled program;
- collectives (all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute): operand
  bytes, group size from ``replica_groups``, and the bytes each device sends on the wire for a ring
  / pairwise implementation: all-gather and reduce-scatter ``(g-1)/g`` of the full buffer,
  all-reduce twice that, all-to-all ``(g-1)/g`` of its operand, collective-permute its operand.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4,
               "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
               "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\](\{[^}]*\})?")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all", "partition-id",
         "replica-id", "iota", "opt-barrier", "add-dependency"}
_SLICING = {"dynamic-slice", "slice", "gather"}


def shape_dims(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)) for m in _ARRAY.finditer(type_text)]


def _physical_elements(dims: tuple[int, ...], layout: str | None) -> int:
    """Elements an array occupies in memory: its layout's first tile (``{1,0:T(8,128)(2,1)}``: the
    two minor-most dimensions padded to multiples of 8 and 128) pads it, as TPU memory holds it."""
    if not layout or ":" not in layout or not dims:
        return math.prod(dims)
    order_text, _, tiling = layout[1:-1].partition(":")
    tile = re.match(r"T\(([\d,]+)\)", tiling)
    try:
        minor_to_major = [int(d) for d in order_text.split(",") if d.strip()]
    except ValueError:
        return math.prod(dims)
    if not tile or sorted(minor_to_major) != list(range(len(dims))):
        return math.prod(dims)
    sizes = [dims[d] for d in reversed(minor_to_major)]  # physical, major to minor
    t = [int(x) for x in tile.group(1).split(",")]
    for i, ti in enumerate(reversed(t)):
        j = len(sizes) - 1 - i
        if j >= 0:
            sizes[j] = -(-sizes[j] // ti) * ti
    return math.prod(sizes)


def shape_bytes(type_text: str) -> float:
    """Bytes of the arrays in an HLO type (tuples included), tiling padding included."""
    total = 0.0
    for m in _ARRAY.finditer(type_text):
        dims = tuple(int(d) for d in m.group(2).split(",") if d)
        total += DTYPE_BYTES[m.group(1)] * _physical_elements(dims, m.group(3))
    return total


def _matching(text: str, start: int, open_ch: str = "(", close_ch: str = ")") -> int:
    """Index just past the bracket closing the one at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_ch:
            depth += 1
        elif text[i] == close_ch:
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


@dataclass
class Instr:
    name: str
    type_text: str
    opcode: str
    operands: list[str]
    attrs: str
    args: str = ""  # the raw text inside the opcode's parentheses (a parameter's index, a constant)

    @property
    def out_bytes(self) -> float:
        return shape_bytes(self.type_text)


def parse_instruction(line: str) -> Instr | None:
    m = _INSTR.match(line)
    if not m:
        return None
    name, rest = m.group(1), m.group(2)
    if rest.startswith("("):
        end = _matching(rest, 0)
        type_text, rest = rest[:end], rest[end:].lstrip()
    else:
        type_text, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    end = _matching(rest, op.end() - 1)
    operands = re.findall(r"%([\w.\-]+)", rest[op.end():end - 1])
    return Instr(name, type_text, op.group(1), operands, rest[end:], rest[op.end():end - 1])


def parse_module(text: str) -> tuple[dict[str, list[Instr]], str]:
    """Computations by name (instructions in order) and the entry computation's name."""
    comps: dict[str, list[Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None:
            h = _HEADER.match(line.strip())
            if h:
                current = h.group(2)
                comps[current] = []
                if h.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        ins = parse_instruction(line)
        if ins is not None:
            comps[current].append(ins)
    return comps, entry


def _called(attrs: str, key: str) -> list[str]:
    m = re.search(key + r"=\{?([^}]*?)\}?(?:,\s*[\w_]+=|$)", attrs)
    if not m:
        m = re.search(key + r"=(%[\w.\-]+)", attrs)
    return re.findall(r"%([\w.\-]+)", m.group(1)) if m else []


def group_size(attrs: str, num_partitions: int) -> int:
    m = re.search(r"replica_groups=\{(\{[^}]*\})", attrs)
    if m:
        return max(1, len(re.findall(r"\d+", m.group(1))))
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        sizes = dict((k, int(v)) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        axes = re.findall(r"'([^']+)'", m.group(2))
        return math.prod(sizes.get(a, 1) for a in axes) if axes else num_partitions
    return num_partitions


def wire_bytes(kind: str, operand: float, output: float, g: int) -> float:
    if g <= 1 and kind != "collective-permute":
        return 0.0
    frac = (g - 1) / g if g else 0.0
    return {"all-gather": output * frac, "reduce-scatter": operand * frac, "all-reduce": 2 * operand * frac,
            "all-to-all": operand * frac, "collective-permute": operand}[kind]


@dataclass
class Costs:
    flops: float = 0.0
    bytes: float = 0.0
    collectives: dict = field(default_factory=dict)  # kind -> {"count", "operand_bytes", "wire_bytes"}

    def add(self, other: "Costs", times: float = 1.0) -> None:
        self.flops += times * other.flops
        self.bytes += times * other.bytes
        for k, v in other.collectives.items():
            mine = self.collectives.setdefault(k, {"count": 0.0, "operand_bytes": 0.0, "wire_bytes": 0.0})
            for key in mine:
                mine[key] += times * v[key]

    @property
    def wire_bytes(self) -> float:
        return sum(v["wire_bytes"] for v in self.collectives.values())


class Program:
    """One compiled module's costs; ``loops`` lists every while (trip count, body) as walked.
    ``trip_extra`` runs every loop of a given trip count that many more times (the marginal cost of
    one more layer of a scanned stack)."""

    def __init__(self, text: str, count_loops: bool = True, trip_extra: dict[int, int] | None = None,
                 causal_loops: bool = False, source: str | None = None):
        self.comps, self.entry = parse_module(text)
        self.causal_loops = causal_loops
        self.dynamic_loops: list[tuple[int, str]] = []  # (static bound, body) of data-dependent loops
        self._frame_files = stack_frame_files(text) if source else {}
        self.source = source
        self._in_source: dict[int, bool] = {}
        m = re.search(r"num_partitions=(\d+)", text)
        self.num_partitions = int(m.group(1)) if m else 1
        self.count_loops = count_loops
        self.trip_extra = trip_extra or {}  # trip count -> extra iterations (marginal cost of a layer)
        self.loops: list[tuple[int, str]] = []
        self.unknown_trip_counts: list[str] = []
        self._memo: dict[str, Costs] = {}
        self._shapes = {c: {i.name: i for i in ins} for c, ins in self.comps.items()}
        # loop body -> (computation, while instruction) that runs it: where a carried value starts
        self._loop_callers = {body: (c, i) for c, ins in self.comps.items() for i in ins if i.opcode == "while"
                              for body in _called(i.attrs, "body")[:1]}

    def costs(self, comp: str | None = None) -> Costs:
        comp = comp or self.entry
        if comp not in self._memo:
            total = Costs()
            for ins in self.comps.get(comp, []):
                total.add(self._instr_costs(comp, ins))
            self._memo[comp] = total
        return self._memo[comp]

    # ------------------------------------------------------------------------------------------

    def trip_count(self, ins: Instr) -> int | None:
        m = re.search(r'known_trip_count[^\d]*(\d+)', ins.attrs)
        if m:
            return int(m.group(1))
        cond = (_called(ins.attrs, "condition") or [None])[0]
        # The bound of `i < N`: the positive integer constant of the condition (or of its fusions).
        values, compares, stack, seen = [], False, [cond] if cond else [], set()
        while stack:
            c = stack.pop()
            if c in seen:
                continue
            seen.add(c)
            for i in self.comps.get(c, []):
                if i.opcode == "constant" and re.match(r"[su](32|64)\[\]", i.type_text):
                    if re.fullmatch(r"-?\d+", i.args.strip()):
                        values.append(int(i.args))
                elif i.opcode == "compare":
                    compares = True
                elif i.opcode == "fusion":
                    stack.extend(_called(i.attrs, "calls"))
        positive = [v for v in values if v > 0]
        return max(positive) if (compares and positive) else None

    def dynamic_bound(self, comp: str, ins: Instr) -> int | None:
        """The static bound N of a ``while`` whose condition is ``compare(i, n)`` with n a loop
        operand computed as ``minimum(constant N, ...)`` where the loop starts (None: not that form)."""
        cond = (_called(ins.attrs, "condition") or [None])[0]
        body = self.comps.get(cond or "", [])
        if not body:
            return None
        root, limit_name = body[-1], None
        if root.opcode == "fusion":  # a wrapped compare (CPU): its operands are the fusion's
            fused = self.comps.get((_called(root.attrs, "calls") or [""])[0], [])
            params = {i.name: int(i.args) for i in fused if i.opcode == "parameter" and i.args.strip().isdigit()}
            if fused and fused[-1].opcode == "compare" and "direction=LT" in fused[-1].attrs:
                k = params.get(fused[-1].operands[1]) if len(fused[-1].operands) == 2 else None
                limit_name = root.operands[k] if k is not None and k < len(root.operands) else None
        elif root.opcode == "compare" and len(root.operands) == 2 and "direction=LT" in root.attrs:
            limit_name = root.operands[1]
        index = {i.name: int(m.group(1)) for i in body if i.opcode == "get-tuple-element"
                 for m in [re.search(r"index=(\d+)", i.attrs)] if m}
        limit = index.get(limit_name)
        init = self._shapes[comp].get(ins.operands[0]) if ins.operands else None
        if limit is None or init is None or init.opcode != "tuple" or limit >= len(init.operands):
            return None
        bound = self._constant_bound(comp, init.operands[limit], 24)
        return bound if bound is not None and bound > 0 else None

    def _constant_bound(self, comp: str, name: str, depth: int, fused_from: tuple | None = None) -> int | None:
        """A constant upper bound of the value ``name`` of ``comp``: through copies, slices and
        broadcasts, a ``minimum`` / ``clamp`` with a constant, into fusions, and from a loop body's
        parameter to what the loop was started with (per-block limits computed before the loop).
        ``fused_from``: (caller computation, fusion instruction) when ``comp`` is a fused computation."""
        x = self._shapes.get(comp, {}).get(name)
        if x is None or depth < 0:
            return None
        step = depth - 1
        if x.opcode == "constant":
            values = [int(v) for v in re.findall(r"-?\d+", x.args)] if re.fullmatch(r"[\s\d,{}\-]+", x.args) else []
            return max(values) if values else None
        if x.opcode in ("copy", "copy-start", "copy-done", "bitcast", "convert", "reshape", "broadcast", "slice",
                        "dynamic-slice", "transpose") and x.operands:
            return self._constant_bound(comp, x.operands[0], step, fused_from)
        if x.opcode == "minimum":
            bounds = [b for b in (self._constant_bound(comp, o, step, fused_from) for o in x.operands) if b is not None]
            return min(bounds) if bounds else None
        if x.opcode == "clamp" and len(x.operands) == 3:
            return self._constant_bound(comp, x.operands[2], step, fused_from)
        if x.opcode == "dynamic-update-slice" and len(x.operands) > 1:
            # A buffer of per-block limits a scan stacks: bounded by what is written into it (its
            # initial contents, often an uninitialized allocation, are overwritten slot by slot).
            update = self._constant_bound(comp, x.operands[1], step, fused_from)
            initial = self._constant_bound(comp, x.operands[0], step, fused_from)
            return update if initial is None else (max(update, initial) if update is not None else None)
        if x.opcode == "fusion":
            callee = (_called(x.attrs, "calls") or [""])[0]
            body = self.comps.get(callee, [])
            return self._constant_bound(callee, body[-1].name, step, (comp, x)) if body else None
        if x.opcode == "parameter" and fused_from is not None and x.args.strip().isdigit():
            caller, fusion = fused_from
            k = int(x.args)
            return self._constant_bound(caller, fusion.operands[k], step) if k < len(fusion.operands) else None
        if x.opcode == "get-tuple-element" and x.operands:
            src = self._shapes[comp].get(x.operands[0])
            m = re.search(r"index=(\d+)", x.attrs)
            if src is None or m is None:
                return None
            k = int(m.group(1))
            if src.opcode == "tuple" and k < len(src.operands):
                return self._constant_bound(comp, src.operands[k], step, fused_from)
            if src.opcode in ("while", "call"):
                return self._output_bound(src, k, step)
            if src.opcode == "parameter" and comp in self._loop_callers:  # a loop body's carried value
                caller, loop = self._loop_callers[comp]
                init = self._shapes[caller].get(loop.operands[0]) if loop.operands else None
                if init is not None and init.opcode == "tuple" and k < len(init.operands):
                    return self._constant_bound(caller, init.operands[k], step)
        return None

    def _output_bound(self, ins: Instr, k: int, depth: int) -> int | None:
        """A constant bound of element k of what a ``while`` (its body) or a ``call`` returns."""
        callee = (_called(ins.attrs, "body" if ins.opcode == "while" else "to_apply") or [""])[0]
        root = self.comps.get(callee, [None])[-1]
        if root is None or depth < 0:
            return None
        if root.opcode == "tuple":
            return self._constant_bound(callee, root.operands[k], depth - 1) if k < len(root.operands) else None
        return self._output_bound(root, k, depth - 1) if root.opcode in ("while", "call") else None

    def _from_source(self, ins: Instr) -> bool:
        if self.source is None:
            return True
        m = re.search(r"stack_frame_id=(\d+)", ins.attrs)
        if not m:
            return False
        frame = int(m.group(1))
        if frame not in self._in_source:
            self._in_source[frame] = any(f.endswith(self.source) for f in self._frame_files.get(frame, ()))
        return self._in_source[frame]

    def _operand_bytes(self, comp: str, ins: Instr) -> list[float]:
        table = self._shapes[comp]
        return [table[o].out_bytes if o in table else 0.0 for o in ins.operands]

    def _instr_costs(self, comp: str, ins: Instr) -> Costs:
        op = ins.opcode
        c = Costs()
        if op == "while":
            trip = self.trip_count(ins) if self.count_loops else 1
            body = (_called(ins.attrs, "body") or [None])[0]
            bound = self.dynamic_bound(comp, ins) if trip is None and self.causal_loops else None
            if bound is not None:
                self.dynamic_loops.append((bound, body or ins.name))
                trip = (bound + 1) / 2
            elif trip is None:
                self.unknown_trip_counts.append(body or ins.name)
                trip = 1
            self.loops.append((trip, body))
            trip += self.trip_extra.get(trip, 0)
            if body:
                c.add(self.costs(body), trip)
            for cond in _called(ins.attrs, "condition"):
                c.add(self.costs(cond), trip + 1 if self.count_loops else 1)
            return c
        if op == "conditional":
            branches = (_called(ins.attrs, "branch_computations") or _called(ins.attrs, "true_computation")
                        + _called(ins.attrs, "false_computation"))
            options = [self.costs(b) for b in branches]
            if options:
                c.add(max(options, key=lambda x: (x.flops, x.bytes)))
            return c
        if op in ("call", "async-start"):
            for callee in _called(ins.attrs, "calls") or _called(ins.attrs, "to_apply"):
                c.add(self.costs(callee))
            return c
        if op.endswith("-done") or op.endswith("-update") or op in _FREE:
            return c
        if op == "fusion" and self.source is not None:  # the fused dots carry their own frames
            callee = (_called(ins.attrs, "calls") or [None])[0]
            c.flops += self._fused_flops(callee, ins) if callee else 0.0
            c.bytes += self._fusion_bytes(comp, ins, callee) if self._from_source(ins) else 0.0
            return c
        if not self._from_source(ins):
            return c
        kind = op[:-len("-start")] if op.endswith("-start") else op
        kind = "all-to-all" if kind == "ragged-all-to-all" else kind
        if kind in COLLECTIVES:
            operand = sum(self._operand_bytes(comp, ins))
            out = ins.out_bytes if not op.endswith("-start") else operand
            if kind == "all-gather" and op.endswith("-start"):
                out = shape_bytes(ins.type_text) - operand
            elif kind == "reduce-scatter" and op.endswith("-start"):
                out = shape_bytes(ins.type_text) - operand
            g = group_size(ins.attrs, self.num_partitions)
            c.collectives[kind] = {"count": 1.0, "operand_bytes": operand,
                                   "wire_bytes": wire_bytes(kind, operand, out, g)}
            c.bytes += operand + out
            return c
        if op == "custom-call":
            est = re.search(r'"cost_estimate":\{"flops":"(\d+)","transcendentals":"\d+","bytes_accessed":"(\d+)"',
                            ins.attrs)
            boundary = ins.out_bytes + sum(self._operand_bytes(comp, ins))
            if est:
                c.flops += float(est.group(1))
                c.bytes += max(float(est.group(2)), boundary)
            else:
                c.bytes += boundary
            return c
        if op == "fusion":
            callee = (_called(ins.attrs, "calls") or [None])[0]
            c.flops += self._fused_flops(callee) if callee else 0.0
            c.bytes += self._fusion_bytes(comp, ins, callee)
            return c
        c.flops += self._dot_flops(comp, ins)
        c.bytes += self._plain_bytes(comp, ins)
        return c

    def _dot_flops(self, comp: str, ins: Instr, owner: Instr | None = None) -> float:
        """``owner``: the fusion a fused dot sits in, whose frame stands for a dot printed without one."""
        if ins.opcode not in ("dot", "convolution"):
            return 0.0
        if self.source is not None and not self._from_source(
                ins if owner is None or "stack_frame_id=" in ins.attrs else owner):
            return 0.0
        out = shape_dims(ins.type_text)
        if not out or len(ins.operands) < 2:
            return 0.0
        n_out = math.prod(out[0][1])
        table = self._shapes[comp]
        lhs = shape_dims(table[ins.operands[0]].type_text) if ins.operands[0] in table else []
        rhs = shape_dims(table[ins.operands[1]].type_text) if ins.operands[1] in table else []
        if ins.opcode == "dot":
            m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
            dims = [int(d) for d in m.group(1).split(",") if d] if m else []
            k = math.prod(lhs[0][1][d] for d in dims if d < len(lhs[0][1])) if lhs else 1
            return 2.0 * n_out * k
        m = re.search(r"dim_labels=[^_]*_([^-]*)->", ins.attrs)
        if not rhs or not m:
            return 0.0
        labels, kshape = m.group(1), rhs[0][1]
        o = labels.find("o")
        k = math.prod(kshape) / (kshape[o] if 0 <= o < len(kshape) else 1)
        # A base-dilated window (XLA's grouped-matmul lowering) only meets every lhs_dilate-th tap.
        win = re.search(r"window=\{([^}]*)\}", ins.attrs)
        if win:
            size = re.search(r"size=([\dx]+)", win.group(1))
            dil = re.search(r"lhs_dilate=([\dx]+)", win.group(1))
            if size and dil:
                for w, d in zip(size.group(1).split("x"), dil.group(1).split("x")):
                    k *= math.ceil(int(w) / int(d)) / int(w)
        return 2.0 * n_out * k

    def _fused_flops(self, callee: str, owner: Instr | None = None) -> float:
        total = 0.0
        for i in self.comps.get(callee, []):
            if i.opcode == "fusion":
                total += self._fused_flops((_called(i.attrs, "calls") or [""])[0], owner)
            else:
                total += self._dot_flops(callee, i, owner)
        return total

    def _plain_bytes(self, comp: str, ins: Instr) -> float:
        operands = self._operand_bytes(comp, ins)
        if ins.opcode in _SLICING:
            return 2 * ins.out_bytes + sum(operands[1:])
        if ins.opcode == "dynamic-update-slice" and len(operands) > 1:
            return 2 * operands[1] + sum(operands[2:])
        return ins.out_bytes + sum(operands)

    def _sliced_read(self, comp: str, name: str, uses: list[tuple[Instr, int]], depth: int) -> float | None:
        """Bytes a fused computation reads of its parameter ``name`` when every use only slices it
        (also through a nested fusion that only slices its own parameter); None: it reads it whole."""
        if not uses or depth < 0:
            return None
        total = 0.0
        for u, pos in uses:
            if u.opcode in _SLICING and pos == 0:
                total += u.out_bytes
                continue
            if u.opcode != "fusion":
                return None
            inner = (_called(u.attrs, "calls") or [""])[0]
            body = self.comps.get(inner, [])
            param = next((i.name for i in body if i.opcode == "parameter" and i.args.strip() == str(pos)), None)
            inner_uses = [(i, k) for i in body for k, o in enumerate(i.operands) if o == param]
            read = self._sliced_read(inner, param, inner_uses, depth - 1) if param else None
            if read is None:
                return None
            total += read
        return total

    def _fusion_bytes(self, comp: str, ins: Instr, callee: str | None) -> float:
        operands = self._operand_bytes(comp, ins)
        body = self.comps.get(callee or "", [])
        if not body:
            return ins.out_bytes + sum(operands)
        params = {i.name: int(i.args) for i in body if i.opcode == "parameter" and i.args.strip().isdigit()}
        users: dict[str, list[tuple[Instr, int]]] = {}
        for i in body:
            for pos, o in enumerate(i.operands):
                users.setdefault(o, []).append((i, pos))
        root = body[-1]
        roots = [body_i for body_i in body if body_i.name in root.operands] if root.opcode == "tuple" else [root]
        in_place = {r.operands[0] for r in roots if r.opcode == "dynamic-update-slice" and r.operands}
        total = 0.0
        for name, idx in params.items():
            size = operands[idx] if idx < len(operands) else 0.0
            uses = users.get(name, [])
            if name in in_place:
                continue
            sliced = self._sliced_read(callee, name, uses, 3)
            total += size if sliced is None else min(sliced, size)
        for r in roots:
            if r.opcode == "dynamic-update-slice" and len(r.operands) > 1:
                upd = next((i for i in body if i.name == r.operands[1]), None)
                total += upd.out_bytes if upd else r.out_bytes
            else:
                total += r.out_bytes
        return total


def stack_frame_files(text: str) -> dict[int, list[str]]:
    """Stack frame id -> the files of its call stack, innermost first, from the module's
    ``FileNames`` / ``FileLocations`` / ``StackFrames`` tables (a frame printed ``parent_frame_id=p``
    has frame p - 1 as its caller, 0 for none)."""
    def table(name: str) -> str:
        m = re.search(r"^" + name + r"\n(.*?)(?:\n\n|\Z)", text, re.S | re.M)
        return m.group(1) if m else ""

    files = {int(a): b for a, b in re.findall(r'^(\d+) "([^"]*)"$', table("FileNames"), re.M)}
    locations = {int(a): int(b) for a, b in re.findall(r"^(\d+) \{file_name_id=(\d+)\b", table("FileLocations"), re.M)}
    frames = {int(a): (int(b), int(c)) for a, b, c in
              re.findall(r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)\}", table("StackFrames"), re.M)}
    out: dict[int, list[str]] = {}
    for frame in frames:
        chain, f = [], frame
        while f in frames and len(chain) < len(frames):
            location, parent = frames[f]
            chain.append(files.get(locations.get(location, -1), ""))
            f = parent - 1
        out[frame] = chain
    return out


def program_costs(text: str, count_loops: bool = True, causal_loops: bool = False, source: str | None = None) -> dict:
    """The walked costs of a compiled module as plain numbers (see the module docstring)."""
    prog = Program(text, count_loops, causal_loops=causal_loops, source=source)
    c = prog.costs()
    return {"flops": c.flops, "bytes_accessed": c.bytes, "collectives": c.collectives,
            "collective_wire_bytes": c.wire_bytes, "loops": sorted(set(prog.loops)),
            "dynamic_loops": sorted(set(prog.dynamic_loops)),
            "unknown_trip_counts": prog.unknown_trip_counts, "num_partitions": prog.num_partitions}


if __name__ == "__main__":  # python -m dsa_train.parallel.hlo_costs program.hlo.txt [--causal] [--source FILE]
    import argparse

    ap = argparse.ArgumentParser(description="walked costs of an optimized HLO module (XLA's text dump)")
    ap.add_argument("hlo")
    ap.add_argument("--causal", action="store_true", help="data-dependent causal loops at (bound + 1) / 2")
    ap.add_argument("--source", help="charge only instructions whose stack frames pass through this file")
    a = ap.parse_args()
    print(json.dumps(program_costs(open(a.hlo).read(), causal_loops=a.causal, source=a.source), indent=1))


_SCOPED_VMEM = re.compile(r'"used_scoped_memory_configs":\[\{[^}]*"size":"(\d+)"')


def kernel_scoped_vmem(hlo_text: str, kernel_name: str) -> dict[str, int]:
    """Scoped VMEM bytes of each Mosaic (TPU) kernel in compiled HLO text, as its custom call
    records it; ``kernel_name`` a regex whose first group is the kernel's name on that line."""
    found = {}
    for line in hlo_text.splitlines():
        if 'custom_call_target="tpu_custom_call"' not in line:
            continue
        name, used = re.search(kernel_name, line), _SCOPED_VMEM.search(line)
        if name and used:
            found[name.group(1)] = int(used.group(1))
    return found
