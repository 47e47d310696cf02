"""Pass 3 — provenance: which modalities each value depends on.

Requires: ``normalize`` (``meta["lmd_op"]``).
Ensures: every node has ``meta["lmd_provenance"]`` (frozenset of modality indices),
``meta["lmd_discrete"]`` (a mask / index / integer value) and ``meta["lmd_kind"]``, one of

- ``"context"``: depends on no modality (parameters, calibration, shapes) — runs once;
- ``"pure"``: depends on exactly one modality (an encoder) — runs once, wholly that modality's;
- ``"mixed"``: depends on two or more, or on a frozen value — decomposed into M+1 components;
- ``"frozen"``: a discrete function of a mixed value (comparison mask, argmax, pool indices),
  or a value its rule makes an operating-point constant (``meta["lmd_constant"]``, pass
  ``constant_outputs``): not decomposed, fixed by a frozen operating point.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import fx

from ..ops import CASTS, DISCRETE_OPS, METADATA_OPS
from .normalize import returns_indices


def provenance(gm: fx.GraphModule, modality_params: Sequence[str]) -> fx.GraphModule:
    """Annotate ``gm``'s nodes with provenance; ``modality_params`` are forward parameter names in order."""
    index = {name: i for i, name in enumerate(modality_params)}
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        if node.op == "placeholder":
            param = node.meta["lmd_param"]
            sources = frozenset({index[param]}) if param in index else frozenset()
            node.meta["lmd_provenance"] = sources
            node.meta["lmd_kind"] = "pure" if sources else "context"
            continue
        inputs = node.all_input_nodes
        sources = frozenset().union(*(n.meta["lmd_provenance"] for n in inputs)) if inputs else frozenset()
        # Modalities reaching the node other than through frozen (constant) values.
        live = frozenset().union(*(n.meta["lmd_provenance"] for n in inputs if n.meta["lmd_kind"] != "frozen")) \
            if inputs else frozenset()
        kinds = {n.meta["lmd_kind"] for n in inputs}
        op = node.meta.get("lmd_op")
        if node.op == "get_attr" or op in METADATA_OPS:
            kind = "context"
        elif op == "getitem" and "mixed" in kinds and returns_indices(node.args[0]) and node.args[1] == 1:
            kind = "frozen"
        elif "mixed" in kinds or len(live) >= 2:
            kind = "frozen" if op in DISCRETE_OPS else "mixed"
        elif "frozen" in kinds:
            # A frozen value combined with one modality's (non-discrete) value is decomposed:
            # the frozen value is a constant of that computation. Combined with context or a
            # discrete value (a mask from token ids) only, it stays frozen.
            values = any(n.meta["lmd_kind"] == "pure" and not n.meta.get("lmd_discrete") for n in inputs)
            kind = "mixed" if values and op not in DISCRETE_OPS else "frozen"
        else:
            kind = "pure" if sources else "context"
        if kind == "mixed" and node.meta.get("lmd_constant"):  # pass constant_outputs
            kind = "frozen"
        if kind == "context":
            sources = frozenset()
        node.meta["lmd_provenance"] = sources
        node.meta["lmd_kind"] = kind
        node.meta["lmd_discrete"] = _discrete(node)
    return gm


def _discrete(node: fx.Node) -> bool:
    """Whether a node's value is discrete (a mask, indices, token ids): from the dtype
    torch.export recorded, else from its op — a comparison, or a shape op on discrete inputs.
    A pure discrete value is a constant where it meets a mixed computation (an operating-point
    constant, like a frozen node), never a decomposed operand."""
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return not (value.is_floating_point() or value.is_complex())
    op = node.meta.get("lmd_op")
    if op in DISCRETE_OPS:
        return True
    if op in CASTS or node.op in ("placeholder", "get_attr"):
        return False
    inputs = [n for n in node.all_input_nodes if n.meta.get("lmd_kind") != "context"]
    return bool(inputs) and all(n.meta.get("lmd_discrete") for n in inputs)
