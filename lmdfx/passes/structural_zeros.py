"""Pass 6a — structural zeros: never compute a component that is known to be zero.

Requires: ``rewrite`` (a decomposed GraphModule whose branches are ``lmd_rules.*`` calls).
Ensures: a convolution / linear layer whose decomposed input is a concatenation of
undecomposed operands (pure-modality encoder outputs, context tensors) — the fusion layer of
a fusion model — no longer runs once per component on a lifted stack that is zero outside one
operand. Each operand goes through the matching input-channel slice of the weight instead,
``conv(cat(x_1, 0), W) = conv(x_1, W[:, :C_1])`` (or, for a concatenation of tokens, through
the whole layer: ``linear(cat(x_1, 0)) = cat(linear(x_1), 0)``), so the layer costs one
layer in all and the lifted stacks and their concatenation are never materialised. Results
are unchanged up to floating-point summation order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from ..rules.base import BIAS, bind, lift
from ..rules.linear import _CONV, _CONV_T, AdditiveRule, AffineRule
from .rewrite import RULES_ATTR, residual

_LINEAR = (("input", None), ("weight", None), ("bias", None))
_CAT = (("tensors", None), ("dim", 0))


def _signature(op: str) -> tuple[tuple[str, Any], ...]:
    if op == "linear":
        return _LINEAR
    return _CONV_T if op.startswith("conv_transpose") else _CONV


def _slice_op(op: str, x: torch.Tensor, weight: torch.Tensor, start: int, width: int, p: dict) -> torch.Tensor:
    """The layer without bias applied to ``x``, using the input channels [start, start+width) of the weight."""
    if op == "linear":
        return F.linear(x, weight.narrow(1, start, width))
    rest = {name: value for name, value in p.items() if name not in ("input", "weight", "bias")}
    if op.startswith("conv_transpose"):
        return getattr(F, op)(x, weight.narrow(0, start, width), None, **rest)
    return getattr(F, op)(x, weight.narrow(1, start, width), None, **rest)


def _channel_dim(op: str, rank: int) -> int:
    """The axis of the original input that the layer contracts (its input channels)."""
    if op == "linear":
        return rank - 1
    spatial = int(op[-2])
    return 1 if rank == spatial + 2 else 0


def sliced_affine(
    affine: AffineRule, cat: AdditiveRule, parts: list, owners: list[int], k: int, args: tuple, kwargs: dict
) -> torch.Tensor:
    """The stack of ``affine`` applied to ``cat(parts)``, where part i belongs wholly to component
    ``owners[i]``: component c is the sum over c's parts of the layer on that part with the
    matching weight slice; a component without parts is zero; the layer's bias is the bias
    component's. Along an axis the layer does not contract (tokens for a linear layer, the batch
    for a convolution), each part goes through the whole layer once instead. Falls back to
    lifting and the generic rules otherwise (a spatial axis of a convolution, grouped
    convolution over the channels)."""
    op = affine.call.op
    p = bind(_signature(op), args, kwargs)
    weight, bias = p["weight"], p["bias"]
    first = parts[0]
    dim = cat.call.static(_CAT)["dim"]
    rank = first.dim() if isinstance(first, torch.Tensor) else 0
    same = isinstance(dim, int) and rank > 0 and all(isinstance(x, torch.Tensor) and x.dim() == rank for x in parts)
    contracted = same and dim % rank == _channel_dim(op, rank)
    if same and not contracted and _commutes(op, dim % rank, rank):
        return _per_part(op, weight, bias, p, parts, owners, k, dim)
    if not (contracted and p.get("groups", 1) == 1):
        # Pure operands as the lifted stacks the cat rule expects; context operands stay plain.
        lifted = [x if owner == BIAS else lift(x, owner, k) for x, owner in zip(parts, owners)]
        cat_args = (lifted, *cat.call.args[1:])
        stack = cat(None, cat_args, cat.call.kwargs)
        return affine(None, (stack, *args[1:]), kwargs) if "input" not in kwargs else affine(
            None, args, {**kwargs, "input": stack})
    outputs: list[torch.Tensor | None] = [None] * k
    start = 0
    for x, owner in zip(parts, owners):
        width = x.shape[dim]
        y = _slice_op(op, x, weight, start, width, p)
        index = owner % k
        outputs[index] = y if outputs[index] is None else outputs[index] + y
        start += width
    like = next(y for y in outputs if y is not None)
    if bias is not None:
        shaped = bias if op == "linear" else bias.view(-1, *([1] * int(op[-2])))
        outputs[BIAS] = shaped.expand_as(like) if outputs[BIAS] is None else outputs[BIAS] + shaped
    zeros = None
    for index, y in enumerate(outputs):
        if y is None:
            zeros = torch.zeros_like(like) if zeros is None else zeros
            outputs[index] = zeros
    return torch.stack(outputs)


def _commutes(op: str, dim: int, rank: int) -> bool:
    """Whether the layer applied to a concatenation along ``dim`` is the concatenation of the
    layer on each part: any axis but the features for a linear layer, the batch axis for a
    convolution (spatial axes do not: kernels straddle the seams)."""
    if op == "linear":
        return dim != rank - 1
    return dim == 0 and rank == int(op[-2]) + 2


def _per_part(op: str, weight: torch.Tensor, bias: Any, p: dict, parts: list, owners: list[int], k: int,
              dim: int) -> torch.Tensor:
    """The stack of the layer over ``cat(parts, dim)`` along a non-contracted axis: each part goes
    through the layer once, and component c is the concatenation of c's part outputs with
    zeros in the other parts' places; the layer's bias is the bias component's everywhere."""
    width = weight.shape[0 if op.startswith("conv_transpose") else 1]
    outputs = [_slice_op(op, x, weight, 0, width, p) for x in parts]
    zeros = [torch.zeros_like(y) for y in outputs]
    stack = torch.stack([
        torch.cat([y if owner % k == c else z for y, z, owner in zip(outputs, zeros, owners)], dim)
        for c in range(k)
    ])
    if bias is not None:
        shaped = bias if op == "linear" else bias.view(-1, *([1] * int(op[-2])))
        stack[BIAS] += shaped
    return stack


def _rule_of(gm: fx.GraphModule, node: Any) -> Any:
    if isinstance(node, fx.Node) and node.op == "call_module" and str(node.target).startswith(f"{RULES_ATTR}."):
        return gm.get_submodule(node.target)
    return None


def _undecomposed_part(node: Any, k: int) -> tuple[Any, int] | None:
    """(value, owning component) of a cat operand that is a lifted pure value or a context
    tensor (the bias component's); None for a decomposed stack."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is lift:
        value, index, _ = node.args
        return value, index
    if isinstance(node, fx.Node) and node.op == "call_module" and str(node.target).startswith(f"{RULES_ATTR}."):
        return None
    return node, BIAS


def structural_zeros(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite every affine layer over a concatenation of undecomposed operands (see module doc)."""
    for node in list(gm.graph.nodes):
        affine = _rule_of(gm, node)
        if not isinstance(affine, AffineRule):
            continue
        _, stacked_args, stacked_kwargs = node.args
        source = stacked_args[0] if stacked_args else stacked_kwargs.get("input")
        cat = _rule_of(gm, source)
        if not isinstance(cat, AdditiveRule) or cat.call.op != "cat":
            continue
        _, cat_args, cat_kwargs = source.args
        tensors = cat_args[0] if cat_args else cat_kwargs.get("tensors")
        if cat_kwargs.get("tensors") is not None or not isinstance(tensors, (list, tuple)):
            continue
        k = _components(gm, tensors)
        pieces = [_undecomposed_part(t, k or 0) for t in tensors]
        if k is None or any(piece is None for piece in pieces):
            continue
        parts = [value for value, _ in pieces]
        owners = [owner for _, owner in pieces]
        # The input slot is not read by sliced_affine: leave None there so the stack can go.
        if stacked_args:
            stacked_args = (None, *stacked_args[1:])
        else:
            stacked_kwargs = {**stacked_kwargs, "input": None}
        with gm.graph.inserting_before(node):
            cat_module = gm.graph.get_attr(source.target)
            affine_module = gm.graph.get_attr(node.target)
            fused = gm.graph.call_function(
                sliced_affine, (affine_module, cat_module, parts, owners, k, stacked_args, stacked_kwargs))
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        gm.graph.erase_node(node)
        _drop_exact_residuals(gm, source)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def _drop_exact_residuals(gm: fx.GraphModule, stack: fx.Node) -> None:
    """Remove the equality check of a concatenation of undecomposed operands when nothing else
    reads its stack: that stack sums to the trunk value exactly (one nonzero per element), and
    the check alone would keep the lifted stacks alive."""
    users = list(stack.users)
    if not users or any(u.op != "call_function" or u.target is not residual for u in users):
        return
    output = next(n for n in gm.graph.nodes if n.op == "output")
    result = dict(output.args[0])
    result["residuals"] = {name: value for name, value in result["residuals"].items() if value not in users}
    output.args = (result,)
    for user in users:
        gm.graph.erase_node(user)


def _components(gm: fx.GraphModule, tensors: Any) -> int | None:
    """K = M + 1, read off the first lifted operand (None if no operand is lifted)."""
    for t in tensors:
        if isinstance(t, fx.Node) and t.op == "call_function" and t.target is lift:
            return t.args[2]
    return None
