"""Pass 2 — normalise op spellings.

Requires: a traced GraphModule (pass ``trace``).
Ensures: every ``call_*`` node has ``meta["lmd_op"]``, one canonical op name per operation
(``nn.ReLU(inplace=True)``, ``F.relu``, ``torch.relu``, ``x.relu()``, ``x.relu_()`` are all
``"relu"``); known ``torch.nn`` leaf modules are rewritten as ``call_function`` nodes on their
parameters (``get_attr``), so rules see one form; in-place ops are out-of-place, so no value a
rule reads as its operating point is overwritten; identity and eval-mode dropout modules are gone.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from ..ops import (ALIASES, ALWAYS_INDEXED, FUNCTION_ALIASES, IN_PLACE_OPERATORS, MAYBE_INDEXED, METADATA_ATTRS,
                   METHOD_ALIASES, MODULE_CONVERTERS, OPERATORS, PASS_THROUGH_MODULES)


def canonical_name(node: fx.Node) -> str:
    """The canonical op name of a ``call_*`` node (module calls: the module's class name)."""
    if node.op == "call_module":
        return type(node.graph.owning_module.get_submodule(node.target)).__name__
    if node.op == "call_method":
        name = node.target
    elif isinstance(node.target, torch._ops.OpOverload):  # torch.export: aten.conv2d.default -> conv2d
        name = node.target.overloadpacket.__name__
    elif node.target in OPERATORS:
        name = OPERATORS[node.target]
        if name == "getattr":
            attr = node.args[1]
            return "metadata" if attr in METADATA_ATTRS else attr
    else:
        name = getattr(node.target, "__name__", str(node.target))
    if name.endswith("_") and not name.endswith("__") and hasattr(torch.Tensor, name[:-1]):
        name = name[:-1]
    return ALIASES.get(name, name)


def _same_op(node: fx.Node) -> None:
    """Rewrite an alias spelling (``torch.moveaxis``) to the op it names (``torch.movedim``)."""
    if node.op == "call_function" and node.target in FUNCTION_ALIASES:
        node.target = FUNCTION_ALIASES[node.target]
    elif node.op == "call_method" and node.target in METHOD_ALIASES:
        node.target = METHOD_ALIASES[node.target]


def _out_of_place(node: fx.Node) -> None:
    """Rewrite an in-place call as its out-of-place form (same result, no mutation)."""
    if node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__"):
        if hasattr(torch.Tensor, node.target[:-1]):
            node.target = node.target[:-1]
    elif node.op == "call_function":
        if node.target in IN_PLACE_OPERATORS:
            node.target = IN_PLACE_OPERATORS[node.target]
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            for namespace in (F, torch):
                if getattr(namespace, name, None) is node.target and hasattr(namespace, name[:-1]):
                    node.target = getattr(namespace, name[:-1])
    if node.kwargs.get("inplace"):
        node.kwargs = {**node.kwargs, "inplace": False}


def _module_as_function(gm: fx.GraphModule, node: fx.Node) -> None:
    module = gm.get_submodule(node.target)
    if isinstance(module, PASS_THROUGH_MODULES) and len(node.args) == 1 and not node.kwargs:
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        return
    convert = MODULE_CONVERTERS.get(type(module))
    converted = convert(module) if convert is not None and len(node.args) == 1 and not node.kwargs else None
    if converted is None:
        return
    fn, params, hyper = converted
    with gm.graph.inserting_before(node):
        tensors = [gm.graph.get_attr(f"{node.target}.{p}") if getattr(module, p, None) is not None else None
                   for p in params]
        for attr in tensors:
            if attr is not None:
                attr.meta.update(lmd_layer=node.target, lmd_source=node.meta.get("lmd_source", ""))
        # Parameters by keyword: positional order differs between functions (group_norm).
        call = gm.graph.call_function(fn, (node.args[0],), {**dict(zip(params, tensors)), **hyper})
    call.meta.update(node.meta)
    call.meta["lmd_module_type"] = type(module)
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)


def returns_indices(node: fx.Node) -> bool:
    """Whether ``node`` returns a (values, indices) pair."""
    op = node.meta.get("lmd_op")
    if op in ALWAYS_INDEXED:
        return True
    if op in MAYBE_INDEXED:
        second = node.args[1] if len(node.args) > 1 else None
        return "dim" in node.kwargs or isinstance(second, int)
    if op and "max_pool" in op:
        # F.max_pool2d(..., return_indices=True) traces as max_pool2d_with_indices
        return bool(node.kwargs.get("return_indices", False)) or getattr(node.target, "__name__", "").endswith(
            "_with_indices")
    return False


def _named_field_as_getitem(node: fx.Node) -> None:
    """``torch.max(x, 1).values`` -> ``operator.getitem(..., 0)``: one spelling for pair fields."""
    if node.op == "call_function" and node.target is getattr and isinstance(node.args[0], fx.Node):
        field = node.args[1]
        if field in ("values", "indices") and returns_indices(node.args[0]):
            node.target = operator.getitem
            node.args = (node.args[0], 0 if field == "values" else 1)


def normalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Canonicalise ``gm`` in place and return it (see the module docstring)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            _module_as_function(gm, node)
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            _out_of_place(node)
            _same_op(node)
            _named_field_as_getitem(node)
            node.meta["lmd_op"] = canonical_name(node)
    gm.graph.lint()
    gm.recompile()
    return gm
