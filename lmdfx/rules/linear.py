"""Linear, structural and affine ops: every component goes through the op's linear part;
a constant term goes to the bias component only."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from .base import NodeRef, OpCall, Rule, add_to_bias_, as_bias_stack, bind, first_decomposed
from .registry import register

# Ops linear in their decomposed input, with every other argument a constant.
STRUCTURAL = (
    "view", "reshape", "permute", "transpose", "t", "flatten", "unflatten", "squeeze",
    "unsqueeze", "expand", "expand_as", "repeat", "repeat_interleave", "tile", "movedim",
    "moveaxis", "narrow", "select", "index_select", "gather", "take_along_dim", "chunk",
    "split", "tensor_split", "unbind", "flip", "fliplr", "flipud", "roll", "rot90", "neg",
    "pixel_shuffle", "pixel_unshuffle", "interpolate", "upsample", "upsample_bilinear",
    "upsample_nearest", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "grid_sample", "pad", "sum", "mean",
    "cumsum", "diagonal", "tril", "triu", "to", "float", "double", "half", "bfloat16",
    "type", "type_as", "real", "T", "mT", "unfold", "fold", "as_strided", "trace",
    "div", "mul", "matmul", "mm", "bmm", "einsum", "outer", "tensordot", "dot",
)
# Ops whose input is [N, C, *spatial] with N a batch axis, and its spatial rank (0: any, the
# op requires the batch axis); LinearRule folds the component axis into N for them.
_BATCH_FIRST = {
    "interpolate": 0, "upsample": 0, "upsample_bilinear": 0, "upsample_nearest": 0,
    "avg_pool1d": 1, "avg_pool2d": 2, "avg_pool3d": 3,
    "adaptive_avg_pool1d": 1, "adaptive_avg_pool2d": 2, "adaptive_avg_pool3d": 3,
}
IDENTITY = ("contiguous", "clone", "detach", "identity", "dropout", "alpha_dropout", "feature_alpha_dropout",
            "dropout1d", "dropout2d", "dropout3d", "positive", "resolve_conj", "resolve_neg")
ADDITIVE = ("add", "sub", "rsub", "cat", "concat", "concatenate", "stack", "hstack", "vstack", "where")


@register("linear", ops=STRUCTURAL)
class LinearRule(Rule):
    """The op is linear in its decomposed argument: apply it to every component (vmap)."""

    name = "linear"

    @classmethod
    def supports(cls, call: OpCall) -> bool:
        # A decomposed divisor makes division non-linear (Taylor fallback can take it).
        if call.op == "div":
            return call.decomposed[0] and call.n_decomposed == 1
        if call.op == "pad":
            p = call.static((("input", None), ("pad", None), ("mode", "constant"), ("value", None)))
            return p["mode"] != "constant" or p["value"] in (0, 0.0, None)
        return True

    def forward(self, constants: Any, args: tuple, kwargs: dict) -> Any:
        spatial = _BATCH_FIRST.get(self.call.op)
        if spatial is not None and args and self.call.decomposed[0] and self.call.n_decomposed == 1:
            stack = args[0]
            # [K, N, C, *spatial]: fold the components into the batch axis (one kernel call, no
            # vmap permute-and-copy). Unbatched inputs ([K, C, *spatial]) take the vmap path.
            if stack.dim() >= 4 and (spatial == 0 or stack.dim() == spatial + 3):
                out = self.call.invoke((stack.flatten(0, 1), *args[1:]), kwargs)
                return out.unflatten(0, stack.shape[:2])
        return self.vmap_call(args, kwargs)


@register("getitem", ops=("getitem",))
class GetItemRule(Rule):
    """``x[idx]``: picks a stack out of a multi-output node's tuple, or indexes every component."""

    name = "getitem"

    def forward(self, constants: Any, args: tuple, kwargs: dict) -> Any:
        container, index = args
        if isinstance(container, (tuple, list)):
            return container[index]
        return self.vmap_call(args, kwargs)


@register("identity", ops=IDENTITY)
class IdentityRule(Rule):
    """Value-preserving ops (``clone``, ``contiguous``, dropout in eval): the stack passes."""

    name = "identity"

    def forward(self, constants: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        return first_decomposed(args, kwargs, self.call.decomposed)


class _Summand:
    """Marks a summand slot in an argument template."""


@register("additive", ops=ADDITIVE)
class AdditiveRule(Rule):
    """Sums, differences, concatenation, ``where``: decomposed operands add componentwise;
    a constant operand (context tensor or Python number) is the bias component's."""

    name = "additive"

    def __init__(self, call: OpCall, options: Any):
        super().__init__(call, options)
        # Which leaves of the flattened (args, kwargs) are summands: constant summands are lifted
        # into the bias component; other leaves (``dim``, ``alpha``, the ``where`` condition) stay.
        # Mark summand slots with sentinels and flatten: the sentinels' positions are the leaves
        # to lift (positions stay valid at run time: the argument structure does not change).
        args = list(call.args)
        if call.op in ("add", "sub", "rsub"):
            slots = [(args, 0), (args, 1)]
        elif call.op == "where":
            slots = [(args, 1), (args, 2)]
        else:
            args[0] = list(args[0])
            slots = [(args[0], i) for i in range(len(args[0]))]
        sentinels = []
        for container, index in slots:
            if index < len(container) and isinstance(container[index], (NodeRef, int, float)):
                sentinels.append(_Summand())
                container[index] = sentinels[-1]
        leaves, _ = pytree.tree_flatten((tuple(args), call.kwargs))
        self.summand_positions = [
            i for i, leaf in enumerate(leaves) if call.decomposed[i] or isinstance(leaf, _Summand)
        ]

    def forward(self, constants: Any, args: tuple, kwargs: dict) -> Any:
        op, summands = self.as_function(args, kwargs, self.summand_positions)
        like = first_decomposed(args, kwargs, self.call.decomposed)
        flags = [self.call.decomposed[i] for i in self.summand_positions]
        lifted = [s if flag else as_bias_stack(s, like) for s, flag in zip(summands, flags)]
        return torch.vmap(op)(*lifted)


_CONV = (("input", None), ("weight", None), ("bias", None), ("stride", 1), ("padding", 0),
         ("dilation", 1), ("groups", 1))
_CONV_T = (("input", None), ("weight", None), ("bias", None), ("stride", 1), ("padding", 0),
           ("output_padding", 0), ("groups", 1), ("dilation", 1))


@register("affine", ops=("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                         "conv_transpose3d", "linear"))
class AffineRule(Rule):
    """Convolution and linear layers: the weight on every component, the bias on the bias one.

    The component axis is folded into the batch axis, so one kernel call covers all branches.
    """

    name = "affine"

    @classmethod
    def supports(cls, call: OpCall) -> bool:
        return call.decomposed[0] and call.n_decomposed == 1

    def forward(self, constants: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        op = self.call.op
        if op == "linear":
            p = bind((("input", None), ("weight", None), ("bias", None)), args, kwargs)
            out = F.linear(p["input"], p["weight"])
            bias = p["bias"]
        else:
            p = bind(_CONV_T if op.startswith("conv_transpose") else _CONV, args, kwargs)
            stack, weight, bias = p["input"], p["weight"], p["bias"]
            spatial = int(op[-2])
            batched = stack.dim() == spatial + 3
            folded = stack.flatten(0, 1) if batched else stack
            rest = {k: v for k, v in p.items() if k not in ("input", "weight", "bias")}
            out = getattr(F, op)(folded, weight, None, **rest)
            out = out.unflatten(0, stack.shape[:2]) if batched else out
            if bias is not None:
                bias = bias.view(-1, *([1] * spatial))
        return out if bias is None else add_to_bias_(out, bias)  # out is this rule's own result


__all__ = ["LinearRule", "GetItemRule", "IdentityRule", "AdditiveRule", "AffineRule"]
