"""Pass 1, second frontend — capture with ``torch.export``; and graphs the user traced.

``export(model, example_inputs)`` captures ``model`` with ``torch.export.export(strict=False)``,
functionalises it (``run_decompositions({})``: in-place writes such as ``x[:, 0] = ...``
become ``select_scatter``/``copy``, and no op is decomposed further), and unlifts parameters
and buffers to ``get_attr`` nodes bound to the user's own tensors. The result is the op set of
export's training IR — ``aten.conv2d``, ``aten.linear``, ``aten.layer_norm``,
``aten.scaled_dot_product_attention``, views, ``select``/``slice``, ... — whose canonical names
(the op packet's name) and argument order are those of the ``torch.nn.functional`` calls the
fx frontend sees; the few that differ are rewritten here (BatchNorm). ``graph_module(gm)``
takes a pre-traced ``fx.GraphModule`` as it is.

Ensures the same metadata as ``trace``: ``meta["lmd_param"]`` on placeholders,
``meta["lmd_layer"]`` and ``meta["lmd_source"]`` on every node (from ``nn_module_stack`` and
``stack_trace``), ``meta["lmd_module_outputs"]`` on the nodes that leave a module. The captured
program is specialised to the example's shapes and non-tensor arguments: ``Capture.examples``
records them so a call with others can be refused.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..errors import LMDError, TraceError
from .trace import user_source

# Nodes that only check shapes or guard the capture: no value, nothing to decompose.
_CHECKS = {"_assert_tensor_metadata", "_assert_scalar", "_assert_async", "sym_constrain_range",
           "sym_constrain_range_for_size"}


@dataclass
class Capture:
    """A captured graph, which frontend made it, and what the capture was specialised to."""

    gm: fx.GraphModule
    frontend: str
    examples: dict[str, Any] = field(default_factory=dict)  # parameter -> example value (tensors: shape, dtype)


def example_arguments(model: nn.Module, example_inputs: Any) -> dict[str, Any]:
    """``example_inputs`` (a tuple of positional arguments, a dict of keyword arguments, or a
    ``(args, kwargs)`` pair) bound to ``model.forward``'s parameters, defaults applied."""
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif (isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(example_inputs[0], tuple)
          and isinstance(example_inputs[1], Mapping)):
        args, kwargs = example_inputs[0], dict(example_inputs[1])
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        args, kwargs = (example_inputs,), {}
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as exc:
        raise LMDError(f"example_inputs do not match {type(model).__name__}.forward: {exc}.") from None
    bound.apply_defaults()
    return dict(bound.arguments)


def export(model: nn.Module, example_inputs: Any) -> Capture:
    """Capture ``model`` with torch.export on ``example_inputs`` (see the module docstring)."""
    if example_inputs is None:
        raise LMDError("frontend='export' needs example inputs: lmdfx.compile(model, modalities, frontend='export', "
                       "example_inputs=(args...) or {name: value}). The program is specialised to their shapes.")
    arguments = example_arguments(model, example_inputs)
    try:
        program = torch.export.export(model, (), arguments, strict=False)
    except Exception as exc:  # export raises many types; all mean "cannot capture"
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TraceError(f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: {text} — "
                         "data-dependent Python control flow or sizes need torch.cond / torch._check, or mark the "
                         "submodule as a leaf and use frontend='fx'.") from exc
    capture = exported_program(program, list(arguments))
    _bind_to(capture.gm, model)
    capture.examples = {name: describe(value) for name, value in arguments.items()}
    return capture


def exported_program(program: torch.export.ExportedProgram, parameters: list[str] | None = None) -> Capture:
    """An ``ExportedProgram`` as an annotated GraphModule (functionalised, parameters unlifted)."""
    gm = program.run_decompositions({}).module()
    out_spec = gm._out_spec
    gm.graph._codegen = fx.graph.CodeGen()  # plain placeholders and outputs: the rewrite adds its own
    for node in list(gm.graph.nodes):
        if node.op == "output":
            node.args = (pytree.tree_unflatten(list(pytree.tree_leaves(node.args[0])), out_spec),)
        elif (node.op == "call_module" and node.target == "_guards_fn") or (
                node.op == "call_function" and _packet(node.target) in _CHECKS):
            gm.graph.erase_node(node)
    _batch_norm_as_functional(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = parameters if parameters is not None else [n.name for n in placeholders]
    if len(names) != len(placeholders):
        names = [n.name for n in placeholders]
    for node, name in zip(placeholders, names):
        node.meta["lmd_param"] = name
    _annotate(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return Capture(gm, "export")


def graph_module(gm: fx.GraphModule, parameters: list[str]) -> Capture:
    """A GraphModule the user traced (e.g. ``transformers.utils.fx.symbolic_trace``), annotated."""
    copy = fx.GraphModule(gm, gm.graph, class_name=type(gm).__name__)
    placeholders = [n for n in copy.graph.nodes if n.op == "placeholder"]
    for node, name in zip(placeholders, parameters):
        node.meta["lmd_param"] = name
    _annotate(copy)
    return Capture(copy, "graph module")


def _packet(target: Any) -> str:
    return target.overloadpacket.__name__ if isinstance(target, torch._ops.OpOverload) else ""


def _annotate(gm: fx.GraphModule) -> None:
    """Layer, source line and module outputs from the capture's own metadata."""
    scopes: dict[fx.Node, list[str]] = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        paths = [path for path, _ in stack.values() if path]
        scopes[node] = paths
        if node.op == "call_module":
            node.meta["lmd_layer"] = node.target
        else:
            node.meta.setdefault("lmd_layer", paths[-1] if paths else "")
        node.meta["lmd_source"] = user_source(node.meta.get("stack_trace"))
    for node in gm.graph.nodes:
        if node.op == "call_module":
            node.meta["lmd_module_outputs"] = [node.target]
            continue
        leaving = [path for path in scopes[node]
                   if any(path not in scopes.get(user, []) for user in node.users)]
        if leaving:
            node.meta["lmd_module_outputs"] = leaving


def _batch_norm_as_functional(gm: fx.GraphModule) -> None:
    """``aten._native_batch_norm_legit_no_training`` (a triple) and ``aten.batch_norm`` as the
    ``F.batch_norm`` call the BatchNorm rules read."""
    for node in list(gm.graph.nodes):
        name = _packet(node.target) if node.op == "call_function" else ""
        if name == "_native_batch_norm_legit_no_training":
            x, weight, bias, mean, var, momentum, eps = node.args
            outputs = list(node.users)
            if not all(u.target is operator.getitem and u.args[1] == 0 for u in outputs):
                continue  # the saved statistics are used: leave the op to the fallback
        elif name == "batch_norm":
            x, weight, bias, mean, var, training, momentum, eps = node.args[:8]
            if training:
                continue
            outputs = [node]
        else:
            continue
        with gm.graph.inserting_before(node):
            call = gm.graph.call_function(F.batch_norm, (x, mean, var), dict(
                weight=weight, bias=bias, training=False, momentum=momentum, eps=eps))
        call.meta.update(node.meta)
        for out in outputs:
            out.replace_all_uses_with(call)
            if out is not node:
                gm.graph.erase_node(out)
        gm.graph.erase_node(node)


def _bind_to(gm: fx.GraphModule, model: nn.Module) -> None:
    """Point every ``get_attr`` at the user's own tensor, so edits to the model are followed."""
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value: Any = model
        for part in str(node.target).split("."):
            value = getattr(value, part, None)
        if isinstance(value, torch.Tensor):
            *path, attr = str(node.target).split(".")
            owner = gm.get_submodule(".".join(path)) if path else gm
            delattr(owner, attr)
            setattr(owner, attr, value)


def describe(value: Any) -> Any:
    """What a capture is specialised to: a tensor as ("tensor", shape, dtype), other values as they are."""
    return pytree.tree_map(lambda v: ("tensor", tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v, value)
