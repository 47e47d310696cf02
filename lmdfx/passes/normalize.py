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
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

_OPERATORS = {
    operator.add: "add", operator.iadd: "add", operator.sub: "sub", operator.isub: "sub",
    operator.mul: "mul", operator.imul: "mul", operator.truediv: "div", operator.itruediv: "div",
    operator.floordiv: "floor_divide", operator.matmul: "matmul", operator.imatmul: "matmul",
    operator.neg: "neg", operator.pos: "positive", operator.pow: "pow", operator.getitem: "getitem",
    operator.gt: "gt", operator.lt: "lt", operator.ge: "ge", operator.le: "le", operator.eq: "eq",
    operator.ne: "ne", operator.and_: "logical_and", operator.or_: "logical_or", operator.invert: "logical_not",
    getattr: "getattr", operator.abs: "abs", operator.mod: "remainder",
}
_IN_PLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                       operator.itruediv: operator.truediv, operator.imatmul: operator.matmul}
_ALIASES = {
    "true_divide": "div", "divide": "div", "multiply": "mul", "subtract": "sub", "clip": "clamp",
    "concat": "cat", "concatenate": "cat", "swapaxes": "transpose", "swapdims": "transpose",
    "absolute": "abs", "negative": "neg", "upsample": "interpolate", "upsample_bilinear": "interpolate",
    "upsample_nearest": "interpolate", "greater": "gt", "less": "lt", "greater_equal": "ge",
    "less_equal": "le", "not_equal": "ne", "scaled_dot_product_attention": "scaled_dot_product_attention",
    "_conv_forward": "conv2d",
}
# Attributes of a tensor that describe it rather than compute from its values.
METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout", "is_sparse"}


def canonical_name(node: fx.Node) -> str:
    """The canonical op name of a ``call_*`` node (module calls: the module's class name)."""
    if node.op == "call_module":
        return type(node.graph.owning_module.get_submodule(node.target)).__name__
    if node.op == "call_method":
        name = node.target
    elif node.target in _OPERATORS:
        name = _OPERATORS[node.target]
        if name == "getattr":
            attr = node.args[1]
            return "metadata" if attr in METADATA_ATTRS else attr
    else:
        name = getattr(node.target, "__name__", str(node.target))
    if name.endswith("_") and not name.endswith("__") and hasattr(torch.Tensor, name[:-1]):
        name = name[:-1]
    return _ALIASES.get(name, name)


def _out_of_place(node: fx.Node) -> None:
    """Rewrite an in-place call as its out-of-place form (same result, no mutation)."""
    if node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__"):
        if hasattr(torch.Tensor, node.target[:-1]):
            node.target = node.target[:-1]
    elif node.op == "call_function":
        if node.target in _IN_PLACE_OPERATORS:
            node.target = _IN_PLACE_OPERATORS[node.target]
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            for namespace in (F, torch):
                if getattr(namespace, name, None) is node.target and hasattr(namespace, name[:-1]):
                    node.target = getattr(namespace, name[:-1])
    if node.kwargs.get("inplace"):
        node.kwargs = {**node.kwargs, "inplace": False}


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
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
if hasattr(nn, "RMSNorm"):
    MODULE_CONVERTERS[nn.RMSNorm] = _simple(F.rms_norm, "normalized_shape", "eps", params=("weight",))


def _module_as_function(gm: fx.GraphModule, node: fx.Node) -> None:
    module = gm.get_submodule(node.target)
    if isinstance(module, _PASS_THROUGH) and len(node.args) == 1 and not node.kwargs:
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


# Ops returning (values, indices).
_ALWAYS_INDEXED = {"topk", "sort", "kthvalue", "mode"}
_MAYBE_INDEXED = {"max", "min", "median"}


def returns_indices(node: fx.Node) -> bool:
    """Whether ``node`` returns a (values, indices) pair."""
    op = node.meta.get("lmd_op")
    if op in _ALWAYS_INDEXED:
        return True
    if op in _MAYBE_INDEXED:
        second = node.args[1] if len(node.args) > 1 else None
        return "dim" in node.kwargs or isinstance(second, int)
    if op and "max_pool" in op:
        return bool(node.kwargs.get("return_indices", False))
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
            _named_field_as_getitem(node)
            node.meta["lmd_op"] = canonical_name(node)
    gm.graph.lint()
    gm.recompile()
    return gm
