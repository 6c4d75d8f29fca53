"""The decoder layers under two names: per layer and stacked (``model.scan_layers``).

- per layer (``scan_layers: false``; always in model directories and the HF converter):
  ``model/layers/<i>/self_attn/...``, one entry per layer: the Hugging Face names.
- stacked (``scan_layers: true``): ``model/dense_layers/...`` holds the dense-FFN layers and
  ``model/moe_layers/...`` the MoE layers (their parameters differ), every entry with a leading
  layer axis in layer order.

The functions rename a flat ``{"model/layers/3/mlp/gate/weight": value}`` state between the two.
What a value is (an array, an abstract array, a shape, a lazy slice) is the caller's business:
``take(value, j)`` gives the j-th layer of a stacked value, ``stack(values)`` stacks per-layer
values. Both directions pop entries off the input as they go, so a caller that hands over its only
reference frees each source array as soon as it is converted (at most one parameter is held twice).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

PREFIX = "model"
PER_LAYER = "layers"
STACKS = ("dense_layers", "moe_layers")
STACKED, PER_LAYER_LAYOUT = "stacked", "per-layer"


def layer_stacks(config) -> dict[str, tuple[int, ...]]:
    """Stack name -> the layer indices it holds, in order (empty stacks left out)."""
    layers = range(config.num_hidden_layers)
    dense = tuple(i for i in layers if not config.is_moe_layer(i))
    moe = tuple(i for i in layers if config.is_moe_layer(i))
    return {name: held for name, held in zip(STACKS, (dense, moe)) if held}


def stacks_of(shapes: Mapping[str, tuple]) -> dict[str, tuple[int, ...]]:
    """:func:`layer_stacks` read off a flat ``{name: shape}`` state of either layout: per layer,
    the MoE layers are the ones with a router; stacked, the dense layers come first (a model is
    dense up to ``first_k_dense_replace``) and the leading axes give the stack sizes."""
    layers, moe, sizes = set(), set(), {}
    for key, shape in shapes.items():
        parts = key.split("/")
        if len(parts) > 2 and parts[0] == PREFIX and parts[1] in STACKS:
            sizes[parts[1]] = shape[0]
        layer = _layer_of(key)
        if layer is not None:
            layers.add(layer)
            if parts[3:5] == ["mlp", "gate"]:
                moe.add(layer)
    if sizes:
        n_dense = sizes.get(STACKS[0], 0)
        held = (tuple(range(n_dense)), tuple(range(n_dense, n_dense + sizes.get(STACKS[1], 0))))
    else:
        held = (tuple(sorted(layers - moe)), tuple(sorted(moe)))
    return {name: layers for name, layers in zip(STACKS, held) if layers}


def layout_of(keys: Iterable[str]) -> Optional[str]:
    """``"stacked"``, ``"per-layer"`` or None (no decoder layer in ``keys``). Keys may carry a
    prefix (``model/model/layers/0/...`` in a run checkpoint, optimizer moments)."""
    per_layer = False
    for key in keys:
        parts = key.split("/")
        if any(p in STACKS for p in parts):
            return STACKED
        per_layer = per_layer or any(p == PER_LAYER and n.isdigit() for p, n in zip(parts, parts[1:]))
    return PER_LAYER_LAYOUT if per_layer else None


def to_per_layer(flat: dict[str, Any], stacks: Mapping[str, tuple[int, ...]],
                 take: Callable[[Any, int], Any]) -> dict[str, Any]:
    """Stacked names -> per-layer names (pops ``flat``); entries come out in layer order."""
    out = []
    for position, key in enumerate(list(flat)):
        value = flat.pop(key)
        parts = key.split("/")
        if len(parts) > 2 and parts[0] == PREFIX and parts[1] in STACKS:
            rest = "/".join(parts[2:])
            for j, layer in enumerate(stacks[parts[1]]):
                out.append(((layer, position), f"{PREFIX}/{PER_LAYER}/{layer}/{rest}", take(value, j)))
        else:
            out.append(((_layer_of(key, -1), position), key, value))
    return {key: value for _, key, value in sorted(out, key=lambda entry: entry[0])}


def to_stacked(flat: dict[str, Any], stacks: Mapping[str, tuple[int, ...]],
               stack: Callable[[list], Any]) -> dict[str, Any]:
    """Per-layer names -> stacked names (pops ``flat``). Every layer of a stack must be present."""
    where = {layer: (name, j) for name, held in stacks.items() for j, layer in enumerate(held)}
    out: dict[str, Any] = {}
    groups: dict[str, dict[int, Any]] = {}
    for key in list(flat):
        layer = _layer_of(key)
        if layer is None:
            out[key] = flat.pop(key)
            continue
        if layer not in where:
            raise KeyError(f"{key}: layer {layer} is in no stack of {dict(stacks)}")
        name, j = where[layer]
        rest = "/".join(key.split("/")[3:])
        groups.setdefault(f"{PREFIX}/{name}/{rest}", {})[j] = flat.pop(key)
    for key in list(groups):
        values = groups.pop(key)
        held = stacks[key.split("/")[1]]
        if sorted(values) != list(range(len(held))):
            missing = [held[j] for j in range(len(held)) if j not in values]
            raise KeyError(f"{key}: layers {missing} are missing")
        out[key] = stack([values.pop(j) for j in range(len(held))])
    return out


def _layer_of(key: str, default: Optional[int] = None) -> Optional[int]:
    parts = key.split("/")
    if len(parts) > 3 and parts[0] == PREFIX and parts[1] == PER_LAYER and parts[2].isdigit():
        return int(parts[2])
    return default
