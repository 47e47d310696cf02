"""Element-wise activations: one slope per element from the operating point.

``secant``: c = O / A (the paper's rule, see ``SecantRule`` for f(0) ≠ 0); ``tangent``: c = f'(A). Either way the remainder
O − c·A goes to the bias component, so components sum to O exactly at the operating point.
Optional bias splitting (appendix C) moves the bias component into modalities first.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .base import BIAS, NodeRef, OpCall, Rule, add_to_bias_, first_decomposed, lift
from .registry import register

ACTIVATIONS = (
    "relu", "relu6", "leaky_relu", "rrelu", "prelu", "elu", "selu", "celu", "gelu", "silu",
    "mish", "sigmoid", "tanh", "softplus", "hardswish", "hardsigmoid", "hardtanh", "clamp",
    "clamp_min", "clamp_max", "threshold", "logsigmoid", "softsign", "tanhshrink",
    "hardshrink", "softshrink", "exp", "expm1", "log", "log1p", "sqrt", "rsqrt", "abs",
    "square", "reciprocal", "erf", "sin", "cos", "pow",
)


def bias_shares(stack: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-element redistribution coefficients w, shape like ``stack``: the split components
    are ``stack + w * stack[BIAS]``; w sums to zero over the component axis (exactness)."""
    modal, bias = stack[:BIAS], stack[BIAS]
    m = modal.shape[0]
    bias_sign, modal_sign = torch.sign(bias), torch.sign(modal)
    nonzero = bias_sign != 0
    agree = (modal_sign == bias_sign) & nonzero
    oppose = (modal_sign == -bias_sign) & nonzero
    if mode == "sum":
        # Exactly one modality shares the bias's sign, all others oppose it: that one triggered it.
        single = (agree.sum(0) == 1) & (oppose.sum(0) == m - 1)
        shares = torch.where(single, agree.to(stack.dtype), torch.zeros_like(modal))
    else:  # ratio
        magnitude = modal.abs()
        total = magnitude.sum(0)
        safe_total = torch.where(total > 0, total, torch.ones_like(total))
        proportional = magnitude / safe_total
        inverse = (safe_total - magnitude) / ((m - 1) * safe_total) if m > 1 else torch.ones_like(modal)
        shares = torch.where(agree.all(0), proportional, torch.where(oppose.all(0), inverse, torch.zeros_like(modal)))
    return torch.cat([shares, -shares.sum(0, keepdim=True)])


class ElementwiseRule(Rule):
    """Shared machinery: slope and remainder from the operating point, optional bias split."""

    has_operating_point = True
    closes_with_remainder = True
    # Where the slope is 0, give 0 even for an infinite input (an additive -inf mask before a
    # softmax): 0 * inf would be NaN. Costs one more element-wise op, so only where needed.
    guard_infinite = False

    def slope(self, reference: torch.Tensor, out: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        raise NotImplementedError

    def scaled(self, slope: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        product = x * slope
        return torch.where(slope == 0, torch.zeros_like(product), product) if self.guard_infinite else product

    def operating_point(self, out, args, kwargs, stacked_args, stacked_kwargs):
        reference = first_decomposed(args, kwargs, self.call.decomposed)
        slope = self.slope(reference, out, args, kwargs)
        remainder = (out - self.scaled(slope, reference) if self.guard_infinite
                     else torch.addcmul(out, slope, reference, value=-1))  # one pass for out − slope·A
        constants = {"slope": slope, "remainder": remainder}
        split = self.options.bias_split
        if split != "none":
            constants["shares"] = bias_shares(first_decomposed(stacked_args, stacked_kwargs, self.call.decomposed), split)
        return constants

    def forward(self, constants: dict, args: tuple, kwargs: dict) -> torch.Tensor:
        stack = first_decomposed(args, kwargs, self.call.decomposed)
        if "shares" in constants:
            stack = stack + constants["shares"] * stack[BIAS]
        return add_to_bias_(self.scaled(constants["slope"], stack), constants["remainder"])


@register("activation", "secant", ops=ACTIVATIONS)
class SecantRule(ElementwiseRule):
    """c = (O − f(0)) / A where |A| > eps, else 0: the slope of the segment from (0, f(0)) to
    (A, O). For activations through the origin (ReLU, GELU, SiLU, tanh, ...) this is the
    paper's O / A; for others (sigmoid, softplus) it keeps c bounded by the function's slope
    instead of blowing up near A = 0, and f(0) goes to the bias component with the remainder.
    If f(0) is not finite (log), the segment starts at the origin."""

    name = "secant"

    def __init__(self, call: OpCall, options: Any):
        super().__init__(call, options)
        # f(0) is one number for an element-wise op whose other arguments are numbers: found
        # here, in float64 (any f(0) keeps the components exact: the remainder absorbs it).
        # Otherwise it is per element and per call (a per-channel PReLU weight, clamp bounds,
        # a softmax's 1/n).
        others = [leaf for leaf, flag in zip(pytree.tree_leaves((call.args, call.kwargs)), call.decomposed) if not flag]
        self.scalar_zero: float | None = None
        if call.op in ACTIVATIONS and not any(isinstance(o, (NodeRef, torch.Tensor)) for o in others):
            f, _ = self.as_function(call.args, call.kwargs, [call.decomposed.index(True)])
            at_zero = float(f(torch.zeros((), dtype=torch.float64)))
            self.scalar_zero = at_zero if math.isfinite(at_zero) else 0.0

    def slope(self, reference, out, args, kwargs):
        if self.scalar_zero is not None:
            rise = out - self.scalar_zero if self.scalar_zero != 0.0 else out
        else:
            f, _ = self.as_function(args, kwargs, [self.call.decomposed.index(True)])
            at_zero = f(torch.zeros_like(reference))
            rise = out - torch.where(torch.isfinite(at_zero), at_zero, 0.0)
        # rise / A where |A| > eps, else 0 (also where rise / A is 0/0 or ±inf); a float 0/1
        # mask instead of torch.where: element-wise ops producing bool tensors are several
        # times slower on CPU. A NaN slope where |A| > eps becomes 0, and its NaN output goes
        # to the bias component through the remainder, where the check sees it.
        large = reference.abs().gt_(self.options.eps)
        return rise.div(reference).mul_(large).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)


@register("softmax", "secant")
class SoftmaxSecantRule(SecantRule):
    """Secant slopes for softmax; masked (-inf) inputs get slope 0 and contribute nothing."""

    guard_infinite = True


@register("activation", "tangent")
class TangentRule(ElementwiseRule):
    """c = f'(A), the gradient at the operating point (a DeepLIFT/Taylor flavour)."""

    name = "tangent"
    tangent = True  # without bias splitting

    def slope(self, reference, out, args, kwargs):
        f, _ = self.as_function(args, kwargs, [self.call.decomposed.index(True)])
        _, derivative = torch.func.jvp(f, (reference,), (torch.ones_like(reference),))
        return derivative


@register("softmax", "freeze", ops=("softmax", "log_softmax"))
class FreezeRule(Rule):
    """The output is an operating-point constant (AttnLRP practice for attention weights):
    it is the bias component's, and whatever it multiplies stays linear."""

    name = "freeze"
    has_operating_point = True
    constant_output = True  # the node is frozen (pass constant_outputs): forward runs only if called directly

    def operating_point(self, out, args, kwargs, stacked_args, stacked_kwargs):
        return {"value": out}

    def forward(self, constants: dict, args: tuple, kwargs: dict) -> torch.Tensor:
        like = first_decomposed(args, kwargs, self.call.decomposed)
        return lift(constants["value"], BIAS, like.shape[0])


__all__ = ["SecantRule", "SoftmaxSecantRule", "TangentRule", "FreezeRule", "bias_shares"]
