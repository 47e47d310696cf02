"""One or more small calls per registered op, for the registry-driven rule tests
(``test_registry_rules.py``). Registering a rule for a new op means adding its example here.

An ``Example`` is a function of the decomposed operands (each arrives as camera + radar, so
every component is non-trivial); other arguments are constants inside the function. With
``module`` set, the function takes that module first (it is installed on the test model).
``low`` draws both modalities uniform in [low, low + 1) (positive operands for log, sqrt)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

S = (2, 3, 4, 5)  # the default operand shape


@dataclass
class Example:
    fn: Callable[..., Any]
    shapes: tuple[tuple[int, ...], ...] = (S,)
    module: nn.Module | None = None
    low: float | None = None
    name: str = ""
    extra: dict = field(default_factory=dict)


def _t(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def unary(fn: Callable, shape: tuple[int, ...] = S, low: float | None = None) -> list[Example]:
    return [Example(fn, (shape,), low=low)]


def binary(fn: Callable, shape_a: tuple[int, ...], shape_b: tuple[int, ...], name: str = "") -> list[Example]:
    """``fn(a, b)`` with a decomposed a, a decomposed b, and both decomposed."""
    a, b = _t(*shape_a, seed=1), _t(*shape_b, seed=2)
    return [Example(lambda x: fn(x, b), (shape_a,), name=f"{name}first"),
            Example(lambda y: fn(a, y), (shape_b,), name=f"{name}second"),
            Example(fn, (shape_a, shape_b), name=f"{name}both")]


W4 = _t(6, 3, 3, 3, seed=3)
INDEX = torch.tensor([2, 0, 1])
GRID = torch.rand(2, 4, 5, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2 - 1

EXAMPLES: dict[str, list[Example]] = {
    # -- linear / structural -------------------------------------------------------------------
    "view": unary(lambda x: x.view(2, -1)),
    "reshape": unary(lambda x: x.reshape(6, 20)),
    "permute": unary(lambda x: x.permute(0, 3, 1, 2)),
    "transpose": unary(lambda x: x.transpose(1, 3)) + unary(lambda x: torch.swapaxes(x, 0, 2)),
    "t": unary(lambda x: x.t(), (3, 4)),
    "T": unary(lambda x: x.T, (3, 4)),
    "mT": unary(lambda x: x.mT),
    "flatten": unary(lambda x: x.flatten(1)),
    "unflatten": unary(lambda x: x.unflatten(3, (5, 1))),
    "squeeze": unary(lambda x: x.squeeze(1), (2, 1, 4)),
    "unsqueeze": unary(lambda x: x.unsqueeze(2)),
    "expand": unary(lambda x: x.expand(2, 3, 4, 5), (2, 1, 4, 5)),
    "expand_as": unary(lambda x: x.expand_as(_t(2, 3, 4, 5)), (2, 1, 4, 5)),
    "repeat": unary(lambda x: x.repeat(1, 2, 1, 1)),
    "repeat_interleave": unary(lambda x: x.repeat_interleave(2, dim=1)),
    "tile": unary(lambda x: x.tile((1, 2))),
    "movedim": unary(lambda x: x.movedim(1, 3)) + unary(lambda x: torch.moveaxis(x, 0, 2)),
    "narrow": unary(lambda x: x.narrow(2, 1, 2)),
    "select": unary(lambda x: x.select(1, 2)),
    "index_select": unary(lambda x: x.index_select(1, INDEX)),
    "gather": unary(lambda x: x.gather(1, INDEX.view(1, 3, 1, 1).expand(2, 3, 4, 5))),
    "take_along_dim": unary(lambda x: torch.take_along_dim(x, INDEX.view(1, 3, 1, 1), dim=1)),
    "chunk": unary(lambda x: x.chunk(2, dim=2)[1]),
    "split": unary(lambda x: torch.split(x, [1, 2], dim=1)[1]),
    "tensor_split": unary(lambda x: torch.tensor_split(x, 2, dim=3)[0]),
    "unbind": unary(lambda x: x.unbind(1)[2]),
    "flip": unary(lambda x: x.flip(2)),
    "fliplr": unary(lambda x: torch.fliplr(x), (3, 4)),
    "flipud": unary(lambda x: torch.flipud(x), (3, 4)),
    "roll": unary(lambda x: x.roll(1, 3)),
    "rot90": unary(lambda x: torch.rot90(x, 1, (2, 3))),
    "neg": unary(lambda x: -x),
    "pixel_shuffle": unary(lambda x: F.pixel_shuffle(x, 2), (1, 8, 2, 3)),
    "pixel_unshuffle": unary(lambda x: F.pixel_unshuffle(x, 2), (1, 2, 4, 6)),
    "interpolate": unary(lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
    + unary(lambda x: F.interpolate(x, size=(3, 7), mode="nearest")),
    "avg_pool1d": unary(lambda x: F.avg_pool1d(x, 2), (2, 3, 6)),
    "avg_pool2d": unary(lambda x: F.avg_pool2d(x, 2)),
    "avg_pool3d": unary(lambda x: F.avg_pool3d(x, 2), (1, 2, 4, 4, 4)),
    "adaptive_avg_pool1d": unary(lambda x: F.adaptive_avg_pool1d(x, 2), (2, 3, 6)),
    "adaptive_avg_pool2d": unary(lambda x: F.adaptive_avg_pool2d(x, 1)),
    "adaptive_avg_pool3d": unary(lambda x: F.adaptive_avg_pool3d(x, 2), (1, 2, 4, 4, 4)),
    "grid_sample": unary(lambda x: F.grid_sample(x, GRID, align_corners=False)),
    "pad": unary(lambda x: F.pad(x, (1, 2, 0, 1))) + unary(lambda x: F.pad(x, (1, 1, 1, 1), mode="reflect")),
    "sum": unary(lambda x: x.sum((1, 2))),
    "mean": unary(lambda x: x.mean(-1, keepdim=True)),
    "cumsum": unary(lambda x: x.cumsum(2)),
    "diagonal": unary(lambda x: x.diagonal(0, 2, 3)),
    "tril": unary(lambda x: x.tril()),
    "triu": unary(lambda x: x.triu(1)),
    "to": unary(lambda x: x.to(torch.float32)),
    "float": unary(lambda x: x.float()),
    "double": unary(lambda x: x.double()),
    "half": unary(lambda x: x.half()),
    "bfloat16": unary(lambda x: x.bfloat16()),
    "type": unary(lambda x: x.type(torch.float32)),
    "type_as": unary(lambda x: x.type_as(torch.zeros(1, dtype=torch.float32))),
    "real": unary(lambda x: x.real),
    "unfold": unary(lambda x: x.unfold(3, 2, 1)) + unary(lambda x: F.unfold(x, 2)),
    "fold": unary(lambda x: F.fold(x, (3, 3), 2), (1, 8, 4)),
    "as_strided": unary(lambda x: x.as_strided((2, 2), (1, 2)), (4,)),
    "trace": unary(lambda x: torch.trace(x), (3, 4)),
    "div": unary(lambda x: x / 3.0) + unary(lambda x: torch.div(x, _t(2, 3, 4, 5).abs() + 1)),
    "mul": binary(torch.mul, S, S),
    "matmul": binary(torch.matmul, (2, 3, 4), (2, 4, 5)),
    "mm": binary(torch.mm, (3, 4), (4, 5)),
    "bmm": binary(torch.bmm, (2, 3, 4), (2, 4, 5)),
    "einsum": binary(lambda a, b: torch.einsum("bij,bjk->bik", a, b), (2, 3, 4), (2, 4, 5)),
    "outer": binary(torch.outer, (3,), (4,)),
    "tensordot": binary(lambda a, b: torch.tensordot(a, b, dims=1), (3, 4), (4, 5)),
    "dot": binary(torch.dot, (4,), (4,)),
    # -- identity -------------------------------------------------------------------------------
    "contiguous": unary(lambda x: x.transpose(1, 2).contiguous().view(2, 12, 5)),
    "clone": unary(lambda x: x.clone()),
    "detach": unary(lambda x: x.detach()),
    "dropout": unary(lambda x: F.dropout(x, 0.5, training=False)),
    "alpha_dropout": unary(lambda x: F.alpha_dropout(x, 0.5)),
    "feature_alpha_dropout": unary(lambda x: F.feature_alpha_dropout(x, 0.5)),
    "dropout1d": unary(lambda x: F.dropout1d(x, 0.5, training=False), (2, 3, 4)),
    "dropout2d": unary(lambda x: F.dropout2d(x, 0.5, training=False)),
    "dropout3d": unary(lambda x: F.dropout3d(x, 0.5, training=False), (1, 2, 3, 4, 5)),
    "positive": unary(lambda x: +x),
    "resolve_conj": unary(lambda x: x.resolve_conj()),
    "resolve_neg": unary(lambda x: x.resolve_neg()),
    "getitem": unary(lambda x: x[:, 1:3, ..., 0]),
    # torch.export spellings
    "slice": unary(lambda x: torch.ops.aten.slice.Tensor(x, 2, 1, 3)),
    "index": unary(lambda x: torch.ops.aten.index.Tensor(x, [None, INDEX])),
    "copy": binary(torch.ops.aten.copy.default, (3, 5), (5,)),
    "select_scatter": binary(lambda a, b: torch.select_scatter(a, b, 1, 0), S, (2, 4, 5)),
    "slice_scatter": binary(lambda a, b: torch.slice_scatter(a, b, 2, 1, 3), S, (2, 3, 2, 5)),
    "diagonal_scatter": binary(lambda a, b: torch.diagonal_scatter(a, b, 0, 2, 3), S, (2, 3, 4)),
    "index_put": binary(lambda a, b: torch.index_put(a, (INDEX,), b), (3, 4), (3, 4)),
    # -- additive -------------------------------------------------------------------------------
    "add": binary(torch.add, S, S) + unary(lambda x: x + 2.0) + unary(lambda x: torch.add(x, _t(4, 5), alpha=2)),
    "sub": binary(torch.sub, S, S) + unary(lambda x: 1.0 - x),
    "rsub": unary(lambda x: torch.rsub(x, 2.0)),
    "cat": binary(lambda a, b: torch.cat([a, b], 1), S, S),
    "stack": binary(lambda a, b: torch.stack([a, b]), S, S),
    "hstack": binary(lambda a, b: torch.hstack([a, b]), (3, 4), (3, 4)),
    "vstack": binary(lambda a, b: torch.vstack([a, b]), (3, 4), (3, 4)),
    "where": binary(lambda a, b: torch.where(_t(*S) > 0, a, b), S, S),
    # -- affine ---------------------------------------------------------------------------------
    "conv1d": unary(lambda x: F.conv1d(x, _t(4, 3, 3), _t(4), padding=1), (2, 3, 6)),
    "conv2d": unary(lambda x: F.conv2d(x, W4, _t(6), stride=2, padding=1)),
    "conv3d": unary(lambda x: F.conv3d(x, _t(2, 2, 2, 2, 2), None), (1, 2, 3, 3, 3)),
    "conv_transpose1d": unary(lambda x: F.conv_transpose1d(x, _t(3, 2, 3), _t(2), stride=2), (2, 3, 5)),
    "conv_transpose2d": unary(lambda x: F.conv_transpose2d(x, _t(3, 2, 2, 2), _t(2), stride=2)),
    "conv_transpose3d": unary(lambda x: F.conv_transpose3d(x, _t(2, 2, 2, 2, 2)), (1, 2, 2, 2, 2)),
    "linear": unary(lambda x: F.linear(x, _t(7, 5), _t(7))),
    # -- activations ----------------------------------------------------------------------------
    **{op: unary(getattr(torch, op)) for op in ("relu", "sigmoid", "tanh", "erf", "sin", "cos", "exp", "expm1", "abs",
                                                "square")},
    **{op: unary(getattr(F, op)) for op in ("relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish",
                                            "softplus", "hardswish", "hardsigmoid", "hardtanh", "logsigmoid",
                                            "softsign", "tanhshrink", "hardshrink", "softshrink", "rrelu")},
    "prelu": unary(lambda x: F.prelu(x, torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))),
    "clamp": unary(lambda x: x.clamp(-0.5, 0.7)),
    "clamp_min": unary(lambda x: x.clamp_min(0.1)),
    "clamp_max": unary(lambda x: x.clamp_max(0.1)),
    "threshold": unary(lambda x: F.threshold(x, 0.2, -1.0)),
    "pow": unary(lambda x: x ** 3),
    **{op: unary(getattr(torch, op), low=0.5) for op in ("log", "log1p", "sqrt", "rsqrt", "reciprocal")},
    # -- norms ----------------------------------------------------------------------------------
    "batch_norm": unary(lambda x: F.batch_norm(x, _t(3), _t(3).abs() + 0.5, _t(3), _t(3), training=False)),
    "instance_norm": unary(lambda x: F.instance_norm(x, weight=_t(3), bias=_t(3))),
    "group_norm": unary(lambda x: F.group_norm(x, 1, _t(3), _t(3)), (2, 3, 4, 5)),
    "layer_norm": unary(lambda x: F.layer_norm(x, (5,), _t(5), _t(5))),
    "rms_norm": unary(lambda x: F.rms_norm(x, (4, 5), _t(4, 5), eps=1e-6)),
    # -- selection ------------------------------------------------------------------------------
    "max_pool1d": unary(lambda x: F.max_pool1d(x, 2), (2, 3, 6)),
    "max_pool2d": unary(lambda x: F.max_pool2d(x, 2, padding=1)) + unary(lambda x: F.max_pool2d(x, 2, return_indices=True)[0]),
    "max_pool3d": unary(lambda x: F.max_pool3d(x, 2), (1, 2, 4, 4, 4)),
    "adaptive_max_pool1d": unary(lambda x: F.adaptive_max_pool1d(x, 2), (2, 3, 6)),
    "adaptive_max_pool2d": unary(lambda x: F.adaptive_max_pool2d(x, 2)),
    "adaptive_max_pool3d": unary(lambda x: F.adaptive_max_pool3d(x, 2), (1, 2, 4, 4, 4)),
    "max": unary(lambda x: x.max(1)) + unary(lambda x: x.max()) + binary(torch.max, S, S, "elementwise-"),
    "min": unary(lambda x: torch.min(x, 2, keepdim=True)) + unary(lambda x: x.min()),
    "amax": unary(lambda x: x.amax(1)),
    "amin": unary(lambda x: x.amin(-1, keepdim=True)),
    "topk": unary(lambda x: x.topk(2, dim=3)),
    "sort": unary(lambda x: x.sort(1, descending=True)),
    "maximum": binary(torch.maximum, S, S),
    "minimum": binary(torch.minimum, S, S),
    "fmax": binary(torch.fmax, S, S),
    "fmin": binary(torch.fmin, S, S),
    # -- softmax and attention -----------------------------------------------------------------
    "softmax": unary(lambda x: F.softmax(x, -1)),
    "log_softmax": unary(lambda x: F.log_softmax(x, 1)),
    "scaled_dot_product_attention": [
        Example(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), ((2, 2, 3, 4), (2, 2, 5, 4), (2, 2, 5, 4))),
        Example(lambda v: F.scaled_dot_product_attention(_t(2, 2, 3, 4), _t(2, 2, 5, 4), v), ((2, 2, 5, 4),)),
        Example(lambda q: F.scaled_dot_product_attention(q, _t(2, 2, 5, 4), _t(2, 2, 5, 4), is_causal=False),
                ((2, 2, 3, 4),)),
    ],
    "MultiheadAttention": [
        Example(lambda mha, x, y: mha(x, y, y, need_weights=False)[0], ((2, 3, 8), (2, 5, 8)),
                module=nn.MultiheadAttention(8, 2, batch_first=True)),
    ],
    "TransformerEncoderLayer": [
        Example(lambda layer, x: layer(x), ((2, 3, 8),),
                module=nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)),
    ],
    "TransformerDecoderLayer": [
        Example(lambda layer, x, m: layer(x, m), ((2, 3, 8), (2, 4, 8)),
                module=nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True)),
    ],
    "TransformerEncoder": [
        Example(lambda enc, x: enc(x), ((2, 3, 8),),
                module=nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2,
                                             enable_nested_tensor=False)),
    ],
    "TransformerDecoder": [
        Example(lambda dec, x, m: dec(x, m), ((2, 3, 8), (2, 4, 8)),
                module=nn.TransformerDecoder(nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1)),
    ],
}
