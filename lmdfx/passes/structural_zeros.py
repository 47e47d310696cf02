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

from torch import fx

from ..rules.base import BIAS, lift
from .rewrite import RULES_ATTR, residual

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
        over_concatenation = getattr(affine, "over_concatenation", None)
        if over_concatenation is None:
            continue
        _, stacked_args, stacked_kwargs = node.args
        source = stacked_args[0] if stacked_args else stacked_kwargs.get("input")
        cat = _rule_of(gm, source)
        if not getattr(cat, "concatenates", False):
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
                over_concatenation, (affine_module, cat_module, parts, owners, k, stacked_args, stacked_kwargs))
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
