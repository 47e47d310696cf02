"""Checks shared by the attention and tri-modal tests: equality against the original model and
its module outputs, and separation at a frozen operating point (the 3x3 PCC matrix)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

import lmdfx
from lmdfx.passes import normalize, trace

RTOL = 1e-10  # relative equality tolerance in float64


def tensors(value: Any) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor)]


def relative_error(stack: torch.Tensor, value: torch.Tensor) -> float:
    stack, value = stack.detach(), value.detach()
    return float((stack.sum(0) - value).abs().max() / value.abs().max().clamp_min(1e-300))


def module_outputs(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> dict[str, list[Any]]:
    """Every submodule's outputs (one per call) in a plain forward of ``model``."""
    seen: dict[str, list[Any]] = {}
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: seen.setdefault(name, []).append(out))
               for name, m in model.named_modules() if name]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def node_values(model: nn.Module, inputs: Mapping[str, torch.Tensor], **trace_kwargs: Any) -> dict[str, Any]:
    """The value of every node of the traced, normalised (unrewritten) graph, by node name."""
    gm = normalize(trace(model, **trace_kwargs))
    values: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            values[node.name] = out = super().run_node(node)
            return out

    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        Recorder(gm).run(*[inputs[name] for name in placeholders])
    return values


def check_equality(dec: lmdfx.Decomposer, model: nn.Module, inputs: Mapping[str, torch.Tensor],
                   res: lmdfx.Decomposition | None = None, **trace_kwargs: Any) -> lmdfx.Decomposition:
    """``res.output`` is the model's output; components sum to it, to every recorded layer
    (module outputs compared with the plain model's via hooks, other nodes with an fx
    interpreter run of the traced graph) and to every mixed node (residuals)."""
    res = dec(**inputs) if res is None else res
    expected = model(**inputs)
    for got, want in zip(tensors(res.output), tensors(expected), strict=True):
        if dec.exact_output:
            assert torch.equal(got, want)
        else:  # the trunk of linear layers is the sum of their components: equal to rounding
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    for stack, value in zip(pytree.tree_leaves(res.components), tensors(expected), strict=True):
        assert stack is not None and relative_error(stack, value) < RTOL
    outputs = module_outputs(model, inputs)
    nodes = node_values(model, inputs, **trace_kwargs)
    for name, layer in res.layers.items():
        module, _, call = name.partition(":")
        value = outputs[module][int(call or 0)] if module in outputs else nodes[name]
        for stack, want in zip(tensors(layer), tensors(value), strict=True):
            assert relative_error(stack, want) < RTOL, name
    worst = dec.report().max_relative_residual
    # With a summed trunk only nodes whose rule reads an operating point have a residual.
    assert (worst is None and not dec.exact_output) or worst < RTOL
    return res


def pcc(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().flatten(), b.detach().flatten()
    a, b = a - a.mean(), b - b.mean()
    denominator = a.norm() * b.norm()
    return 1.0 if denominator == 0 and torch.equal(a, b) else float(a @ b / denominator)


def perturbation_pcc(dec: lmdfx.Decomposer, inputs: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
                     modalities: Mapping[str, str]) -> torch.Tensor:
    """M x M: entry [i, j] = PCC of component j before/after replacing modality i's input with
    ``other``'s, at the operating point of ``inputs`` (frozen); computed on the output."""
    res = dec(**inputs)
    names = list(modalities)
    matrix = torch.zeros(len(names), len(names), dtype=torch.float64)
    for i, name in enumerate(names):
        perturbed = dict(inputs)
        perturbed[modalities[name]] = other[modalities[name]]
        moved = dec(**perturbed, operating_point=res.operating_point)
        for j in range(len(names)):
            matrix[i, j] = pcc(tensors(res.components)[0][j], tensors(moved.components)[0][j])
    return matrix


def assert_separates(matrix: torch.Tensor, moving: Sequence[int] | None = None) -> None:
    """Off-diagonal PCC 1 (the other modalities' components do not move); the diagonal entries
    of the ``moving`` modalities (default all) < 1."""
    off = ~torch.eye(matrix.shape[0], dtype=torch.bool)
    assert torch.all(matrix[off] > 1 - 1e-12), matrix
    moving = range(matrix.shape[0]) if moving is None else moving
    assert all(matrix[i, i] < 1 - 1e-6 for i in moving), matrix
