"""Per-op tables shared by the passes and the rules: operator and alias spellings, ``torch.nn``
module converters, and op classes (metadata, discrete, random). Imports nothing from lmdfx."""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

OPERATORS = {
    operator.add: "add", operator.iadd: "add", operator.sub: "sub", operator.isub: "sub",
    operator.mul: "mul", operator.imul: "mul", operator.truediv: "div", operator.itruediv: "div",
    operator.floordiv: "floor_divide", operator.matmul: "matmul", operator.imatmul: "matmul",
    operator.neg: "neg", operator.pos: "positive", operator.pow: "pow", operator.getitem: "getitem",
    operator.gt: "gt", operator.lt: "lt", operator.ge: "ge", operator.le: "le", operator.eq: "eq",
    operator.ne: "ne", operator.and_: "logical_and", operator.or_: "logical_or", operator.invert: "logical_not",
    getattr: "getattr", operator.abs: "abs", operator.mod: "remainder",
}
IN_PLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                       operator.itruediv: operator.truediv, operator.imatmul: operator.matmul}
ALIASES = {
    "true_divide": "div", "divide": "div", "multiply": "mul", "subtract": "sub", "clip": "clamp",
    "concat": "cat", "concatenate": "cat",
    "absolute": "abs", "negative": "neg", "upsample": "interpolate", "upsample_bilinear": "interpolate",
    "upsample_nearest": "interpolate", "greater": "gt", "less": "lt", "greater_equal": "ge",
    "less_equal": "le", "not_equal": "ne", "scaled_dot_product_attention": "scaled_dot_product_attention",
    "_conv_forward": "conv2d", "_to_copy": "to", "_unsafe_view": "view", "alias": "clone", "log_sigmoid": "logsigmoid", "_threshold": "threshold", "moveaxis": "movedim",
    **{f"{pool}{n}d_with_indices": f"{pool}{n}d" for pool in ("max_pool", "adaptive_max_pool") for n in (1, 2, 3)},
}
# Spellings that are the same op under another name, rewritten to it (vmap lacks rules for some).
FUNCTION_ALIASES: dict[Any, Any] = {torch.moveaxis: torch.movedim, torch.swapaxes: torch.transpose,
                                    torch.swapdims: torch.transpose}
METHOD_ALIASES = {"moveaxis": "movedim", "swapaxes": "transpose", "swapdims": "transpose"}
# Attributes of a tensor that describe it rather than compute from its values.
METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout", "is_sparse"}


# Known torch.nn leaf modules as (function, parameter names, hyper-parameters from the module).
Converter = Callable[[nn.Module], tuple[Callable, tuple[str | None, ...], dict[str, Any]]]


def _conv(fn: Callable) -> Converter:
    def convert(m: nn.Module):
        if m.padding_mode != "zeros":
            return None
        return fn, ("weight", "bias"), dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
    return convert


def _conv_transpose(fn: Callable) -> Converter:
    def convert(m: nn.Module):
        return fn, ("weight", "bias"), dict(stride=m.stride, padding=m.padding, output_padding=m.output_padding,
                                            groups=m.groups, dilation=m.dilation)
    return convert


def _batch_norm(m: nn.Module):
    if m.running_mean is None:
        return None  # batch statistics in eval: not an affine map; leave it for the fallback
    return F.batch_norm, ("running_mean", "running_var", "weight", "bias"), dict(training=False, momentum=0.0, eps=m.eps)


def _instance_norm(m: nn.Module):
    use_input_stats = not m.track_running_stats
    return F.instance_norm, ("running_mean", "running_var", "weight", "bias"), dict(
        use_input_stats=use_input_stats, momentum=0.0, eps=m.eps)


def _pool(fn: Callable, *fields: str) -> Converter:
    def convert(m: nn.Module):
        return fn, (), {f: getattr(m, f) for f in fields}
    return convert


def _simple(fn: Callable, *fields: str, params: tuple[str, ...] = ()) -> Converter:
    def convert(m: nn.Module):
        return fn, params, {f: getattr(m, f) for f in fields}
    return convert


MODULE_CONVERTERS: dict[type, Converter] = {
    nn.Conv1d: _conv(F.conv1d), nn.Conv2d: _conv(F.conv2d), nn.Conv3d: _conv(F.conv3d),
    nn.ConvTranspose1d: _conv_transpose(F.conv_transpose1d), nn.ConvTranspose2d: _conv_transpose(F.conv_transpose2d),
    nn.ConvTranspose3d: _conv_transpose(F.conv_transpose3d),
    nn.Linear: _simple(F.linear, params=("weight", "bias")),
    nn.BatchNorm1d: _batch_norm, nn.BatchNorm2d: _batch_norm, nn.BatchNorm3d: _batch_norm,
    nn.InstanceNorm1d: _instance_norm, nn.InstanceNorm2d: _instance_norm, nn.InstanceNorm3d: _instance_norm,
    nn.GroupNorm: _simple(F.group_norm, "num_groups", "eps", params=("weight", "bias")),
    nn.LayerNorm: _simple(F.layer_norm, "normalized_shape", "eps", params=("weight", "bias")),
    nn.ReLU: _simple(F.relu), nn.ReLU6: _simple(F.relu6), nn.LeakyReLU: _simple(F.leaky_relu, "negative_slope"),
    nn.ELU: _simple(F.elu, "alpha"), nn.SELU: _simple(F.selu), nn.CELU: _simple(F.celu, "alpha"),
    nn.GELU: _simple(F.gelu, "approximate"), nn.SiLU: _simple(F.silu), nn.Mish: _simple(F.mish),
    nn.Sigmoid: _simple(torch.sigmoid), nn.Tanh: _simple(torch.tanh), nn.Softplus: _simple(F.softplus, "beta", "threshold"),
    nn.Hardswish: _simple(F.hardswish), nn.Hardsigmoid: _simple(F.hardsigmoid),
    nn.Hardtanh: _simple(F.hardtanh, "min_val", "max_val"), nn.LogSigmoid: _simple(F.logsigmoid),
    nn.Softsign: _simple(F.softsign), nn.PReLU: _simple(F.prelu, params=("weight",)),
    nn.Softmax: _simple(F.softmax, "dim"), nn.LogSoftmax: _simple(F.log_softmax, "dim"),
    nn.MaxPool1d: _pool(F.max_pool1d, "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    nn.MaxPool2d: _pool(F.max_pool2d, "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    nn.MaxPool3d: _pool(F.max_pool3d, "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    nn.AvgPool1d: _pool(F.avg_pool1d, "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
    nn.AvgPool2d: _pool(F.avg_pool2d, "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    nn.AvgPool3d: _pool(F.avg_pool3d, "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    nn.AdaptiveAvgPool1d: _pool(F.adaptive_avg_pool1d, "output_size"),
    nn.AdaptiveAvgPool2d: _pool(F.adaptive_avg_pool2d, "output_size"),
    nn.AdaptiveAvgPool3d: _pool(F.adaptive_avg_pool3d, "output_size"),
    nn.AdaptiveMaxPool1d: _pool(F.adaptive_max_pool1d, "output_size", "return_indices"),
    nn.AdaptiveMaxPool2d: _pool(F.adaptive_max_pool2d, "output_size", "return_indices"),
    nn.AdaptiveMaxPool3d: _pool(F.adaptive_max_pool3d, "output_size", "return_indices"),
    nn.Upsample: _pool(F.interpolate, "size", "scale_factor", "mode", "align_corners"),
    nn.PixelShuffle: _pool(F.pixel_shuffle, "upscale_factor"),
    nn.PixelUnshuffle: _pool(F.pixel_unshuffle, "downscale_factor"),
    nn.Flatten: lambda m: (torch.flatten, (), dict(start_dim=m.start_dim, end_dim=m.end_dim)),
    nn.ZeroPad2d: lambda m: (F.pad, (), dict(pad=m.padding, value=0.0)),
    nn.ConstantPad1d: lambda m: (F.pad, (), dict(pad=m.padding, value=m.value)),
    nn.ConstantPad2d: lambda m: (F.pad, (), dict(pad=m.padding, value=m.value)),
    nn.ReflectionPad2d: lambda m: (F.pad, (), dict(pad=m.padding, mode="reflect")),
    nn.ReplicationPad2d: lambda m: (F.pad, (), dict(pad=m.padding, mode="replicate")),
}
PASS_THROUGH_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
if hasattr(nn, "RMSNorm"):
    MODULE_CONVERTERS[nn.RMSNorm] = _simple(F.rms_norm, "normalized_shape", "eps", params=("weight",))


# Ops returning (values, indices).
ALWAYS_INDEXED = {"topk", "sort", "kthvalue", "mode"}
MAYBE_INDEXED = {"max", "min", "median"}


# Ops whose result describes a tensor (shape, dtype) or ignores its values.
METADATA_OPS = {
    "metadata", "size", "dim", "numel", "nelement", "stride", "is_contiguous", "element_size",
    "get_device", "zeros_like", "ones_like", "empty_like", "full_like", "new_zeros", "new_ones",
    "new_full", "new_empty", "rand_like", "randn_like",
}
# Ops with a discrete result: masks, indices, signs.
DISCRETE_OPS = {
    "gt", "lt", "ge", "le", "eq", "ne", "argmax", "argmin", "argsort", "sign", "isnan", "isinf",
    "isfinite", "logical_and", "logical_or", "logical_not", "logical_xor", "floor", "ceil",
    "round", "trunc", "floor_divide", "remainder", "bool", "long", "int", "heaviside",
    "bucketize", "searchsorted",
}

# Ops that move values without computing new ones (the gate rule looks through them).
RESHAPES = {"view", "reshape", "unsqueeze", "squeeze", "expand", "expand_as", "flatten", "unflatten", "permute",
            "transpose", "contiguous", "clone", "to"}
# Functions whose output gates another value (x · σ(g)): the product rule ``gate`` freezes them.
GATES = {"sigmoid", "hardsigmoid", "softmax", "tanh"}

# Casts: a cast of a mask to a floating dtype is a number, not a mask.
CASTS = {"float", "double", "half", "bfloat16", "to", "type", "type_as"}

# Ops whose result is random even in eval mode.
RANDOM_OPS = {
    "rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm", "bernoulli",
    "multinomial", "normal", "poisson", "uniform", "exponential", "geometric", "cauchy", "log_normal",
    "random", "binomial", "standard_gamma", "sample_dirichlet",
}
# Ops random only in training mode: (position, keyword, default) of their ``training`` flag.
TRAINING_FLAG = {
    "dropout": (2, "training", True), "dropout1d": (2, "training", True), "dropout2d": (2, "training", True),
    "dropout3d": (2, "training", True), "alpha_dropout": (2, "training", False),
    "feature_alpha_dropout": (2, "training", False), "rrelu": (3, "training", False),
}


def is_random(op: str, args: tuple, kwargs: dict) -> bool:
    """Whether a call of canonical ``op`` draws random numbers (dropout with ``training=True``)."""
    if op in RANDOM_OPS:
        return True
    if op not in TRAINING_FLAG:
        return False
    position, keyword, default = TRAINING_FLAG[op]
    flag = kwargs.get(keyword, kwargs.get("train", args[position] if len(args) > position else default))
    return flag is not False
