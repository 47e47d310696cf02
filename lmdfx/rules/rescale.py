"""Element-wise activations by DeepLIFT's rescale rule, with the bias component as the reference.

``rescale``: c = (O − f(D_bias)) / (A − D_bias) per element, the slope of the segment from the
bias component's own point (D_bias, f(D_bias)) to the operating point (A, O). Every component is
multiplied by c and the remainder O − c·A goes to the bias component, so the bias component
becomes exactly f(D_bias) — what the activation gives the bias alone — and the modality
components share O − f(D_bias) in proportion to their pre-activations. ``secant`` is the same
segment drawn from (0, f(0)) instead. Where |A − D_bias| ≤ eps or f(D_bias) is not finite, the
secant slope is used. Like every element-wise rule: equality at the operating point (the
remainder), separation at a frozen one (c and the remainder are constants).
"""

from __future__ import annotations

import torch

from .activations import SecantRule, bias_shares
from .base import BIAS, first_decomposed
from .registry import register


@register("activation", "rescale")
class RescaleRule(SecantRule):
    """c = (O − f(D_bias)) / (A − D_bias): DeepLIFT's rescale multiplier against the bias component."""

    name = "rescale"

    def operating_point(self, out, args, kwargs, stacked_args, stacked_kwargs):
        reference = first_decomposed(args, kwargs, self.call.decomposed)
        stack = first_decomposed(stacked_args, stacked_kwargs, self.call.decomposed)
        constants = {}
        split = self.options.bias_split
        if split != "none":  # the bias split acts first, as in forward: the reference is the split bias
            constants["shares"] = bias_shares(stack, split)
            stack = stack + constants["shares"] * stack[BIAS]
        bias = stack[BIAS]
        f, _ = self.as_function(args, kwargs, [self.call.decomposed.index(True)])
        at_bias = f(bias)
        run = reference - bias
        usable = (run.abs() > self.options.eps) & torch.isfinite(at_bias)
        safe = torch.where(usable, run, torch.ones_like(run))
        slope = torch.where(usable, (out - torch.where(usable, at_bias, out)) / safe,
                            self.slope(reference, out, args, kwargs))
        constants.update(slope=slope, remainder=out - self.scaled(slope, reference))
        return constants


__all__ = ["RescaleRule"]
