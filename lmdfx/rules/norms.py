"""Normalisation layers: statistics are operating-point constants, so each becomes affine.

BatchNorm (eval) is affine already: s = γ/√(var+ε), t = β − s·μ. Per-sample norms freeze the
standard deviation (or RMS) of the reference pass; the mean is handled by the variant:
``ratio`` centres every component on its own mean, ``identity`` gives the reference mean to
the bias component, ``uniform`` spreads it over all components.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import OpCall, Rule, add_to_bias_, bind
from .registry import register

_BATCH_NORM = (("input", None), ("running_mean", None), ("running_var", None), ("weight", None),
               ("bias", None), ("training", False), ("momentum", 0.1), ("eps", 1e-5))


def _channel_view(t: torch.Tensor | None, dims: int) -> torch.Tensor | None:
    """A per-channel vector viewed to broadcast over ``[..., C, *spatial]`` of ``dims`` dims."""
    return None if t is None else t.view(-1, *([1] * (dims - 2)))


def _spread(stack: torch.Tensor, term: torch.Tensor | float, mode: str) -> torch.Tensor:
    """Add a constant term to the bias component, or 1/K of it to every component.
    ``stack`` is always a tensor the caller has just computed, so the bias is added in place."""
    if mode == "uniform":
        return stack + term / stack.shape[0]
    return add_to_bias_(stack, term)


@register("batchnorm", "identity", ops=("batch_norm",))
class BatchNormRule(Rule):
    """Eval-mode BatchNorm: scale every component by s; t to the bias (or 1/K each, ``uniform``)."""

    name = "identity"
    summable = True
    tangent = True

    @classmethod
    def supports(cls, call: OpCall) -> bool:
        return super().supports(call) and not cls.limitation(call)

    @classmethod
    def limitation(cls, call: OpCall) -> str:
        p = call.static(_BATCH_NORM)
        if p["training"] is not False or p["running_mean"] is None:
            return "batch statistics (training=True or no running statistics) are not an affine map"
        return ""

    def forward(self, constants: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        p = bind(_BATCH_NORM, args, kwargs)
        stack = p["input"]
        dims = stack.dim() - 1
        scale = torch.rsqrt(p["running_var"] + p["eps"])
        if p["weight"] is not None:
            scale = scale * p["weight"]
        shift = -p["running_mean"] * scale
        if p["bias"] is not None:
            shift = shift + p["bias"]
        return _spread(stack * _channel_view(scale, dims), _channel_view(shift, dims), self.name)


@register("batchnorm", "uniform")
class BatchNormUniformRule(BatchNormRule):
    name = "uniform"
    tangent = False  # modality components also take 1/K of the shift


_SIGNATURES = {
    "instance_norm": (("input", None), ("running_mean", None), ("running_var", None), ("weight", None),
                      ("bias", None), ("use_input_stats", True), ("momentum", 0.1), ("eps", 1e-5),
                      ("cudnn_enabled", False)),
    "group_norm": (("input", None), ("num_groups", None), ("weight", None), ("bias", None), ("eps", 1e-5)),
    "layer_norm": (("input", None), ("normalized_shape", None), ("weight", None), ("bias", None), ("eps", 1e-5)),
    "rms_norm": (("input", None), ("normalized_shape", None), ("weight", None), ("eps", None)),
}


class PerSampleNormRule(Rule):
    """InstanceNorm, GroupNorm, LayerNorm, RMSNorm with frozen per-sample statistics."""

    has_operating_point = True

    @classmethod
    def supports(cls, call: OpCall) -> bool:
        return super().supports(call) and not cls.limitation(call)

    @classmethod
    def limitation(cls, call: OpCall) -> str:
        if call.op == "instance_norm" and call.static(_SIGNATURES["instance_norm"])["use_input_stats"] is not True:
            return "instance_norm with running statistics (use_input_stats=False) is not handled"
        return ""

    def _grouped(self, x: torch.Tensor, p: dict, leading: int) -> torch.Tensor:
        """View ``x`` so the normalised elements of one statistic are the trailing dims."""
        if self.call.op == "group_norm":
            return x.unflatten(leading + 1, (p["num_groups"], -1))
        return x

    def _axes(self, x: torch.Tensor, p: dict, leading: int) -> tuple[int, ...]:
        op = self.call.op
        if op == "instance_norm":
            return tuple(range(leading + 2, x.dim()))
        if op == "group_norm":
            return tuple(range(leading + 2, x.dim()))
        n = len(p["normalized_shape"]) if not isinstance(p["normalized_shape"], int) else 1
        return tuple(range(x.dim() - n, x.dim()))

    def _eps(self, p: dict, x: torch.Tensor) -> float:
        eps = p["eps"]
        return torch.finfo(x.dtype).eps if eps is None else eps

    def operating_point(self, out, args, kwargs, stacked_args, stacked_kwargs):
        p = bind(_SIGNATURES[self.call.op], args, kwargs)
        x = self._grouped(p["input"], p, 0)
        axes = self._axes(x, p, 0)
        if self.call.op == "rms_norm":
            mean = torch.zeros_like(x.mean(axes, keepdim=True))
            sigma = torch.sqrt(x.pow(2).mean(axes, keepdim=True) + self._eps(p, x))
        elif self.call.op == "layer_norm":
            # The op's own statistics kernel: several times faster than var_mean on CPU, above
            # all over the channels of a permuted (channels-last) view as in LayerNorm2d.
            _, mean, rstd = torch.native_layer_norm(x, [x.shape[a] for a in axes], None, None, self._eps(p, x))
            mean, sigma = mean.to(x.dtype), rstd.reciprocal().to(x.dtype)  # low precision: float32 statistics
        else:
            variance, mean = torch.var_mean(x, axes, unbiased=False, keepdim=True)  # one pass over x
            sigma = torch.sqrt(variance + self._eps(p, x))
        return {"mean": mean, "sigma": sigma}

    def forward(self, constants: dict, args: tuple, kwargs: dict) -> torch.Tensor:
        p = bind(_SIGNATURES[self.call.op], args, kwargs)
        stack = p["input"]
        x = self._grouped(stack, p, 1)
        mean, sigma = constants["mean"], constants["sigma"]
        if self.name == "ratio" and self.call.op != "rms_norm":
            normalised = (x - x.mean(self._axes(x, p, 1), keepdim=True)) / sigma
        else:
            normalised = _spread(x / sigma, -mean / sigma, self.name)
        normalised = normalised.reshape(stack.shape)
        weight, bias = p["weight"], p.get("bias")
        if self.call.op in ("instance_norm", "group_norm"):
            weight, bias = _channel_view(weight, stack.dim() - 1), _channel_view(bias, stack.dim() - 1)
        if weight is not None:
            normalised = normalised * weight
        if bias is not None:
            normalised = _spread(normalised, bias, "uniform" if self.name == "uniform" else "identity")
        return normalised


@register("norm", "ratio", ops=("instance_norm", "group_norm", "layer_norm", "rms_norm"))
class NormRatioRule(PerSampleNormRule):
    name = "ratio"


@register("norm", "identity")
class NormIdentityRule(PerSampleNormRule):
    name = "identity"


@register("norm", "uniform")
class NormUniformRule(PerSampleNormRule):
    name = "uniform"


__all__ = ["BatchNormRule", "BatchNormUniformRule", "NormRatioRule", "NormIdentityRule", "NormUniformRule"]
