"""Linear, structural and affine ops: every component goes through the op's linear part;
a constant term goes to the bias component only."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from .base import BIAS, NodeRef, OpCall, Rule, add_to_bias_, as_bias_stack, bind, first_decomposed, fits, lift
from .registry import register
from .stacked import aligned, broadcasts, matmul_broadcasts, on_stack

# Ops that multiply their operands: linear in either operand when only one is decomposed (a
# product of two decomposed values is the ``product`` family's).
MULTIPLICATIVE_SLOTS: dict[str, tuple[int | str, ...]] = {
    "mul": (0, 1, "input", "other"), "matmul": (0, 1, "input", "other"), "mm": (0, 1, "input", "mat2"),
    "bmm": (0, 1, "input", "mat2"), "einsum": (1, 2, 3, 4, 5, 6, "operands"), "outer": (0, 1, "input", "vec2"),
    "tensordot": (0, 1, "a", "b"), "dot": (0, 1, "input", "tensor"),
}
MULTIPLICATIVE = tuple(MULTIPLICATIVE_SLOTS)
# Ops linear in their decomposed input, with every other argument a constant.
STRUCTURAL = (
    "view", "reshape", "permute", "transpose", "t", "flatten", "unflatten", "squeeze",
    "unsqueeze", "expand", "expand_as", "repeat", "repeat_interleave", "tile", "movedim",
    "narrow", "select", "index_select", "gather", "take_along_dim", "chunk",
    "split", "tensor_split", "unbind", "flip", "fliplr", "flipud", "roll", "rot90", "neg",
    "pixel_shuffle", "pixel_unshuffle", "interpolate", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "grid_sample", "pad", "sum", "mean",
    "cumsum", "diagonal", "tril", "triu", "to", "float", "double", "half", "bfloat16",
    "type", "type_as", "real", "T", "mT", "unfold", "fold", "as_strided", "trace",
    "div", "slice", "index", *MULTIPLICATIVE,
)
# Ops whose input is [N, C, *spatial] with N a batch axis, and its spatial rank (0: any, the
# op requires the batch axis); LinearRule folds the component axis into N for them.
_BATCH_FIRST = {
    "interpolate": 0,
    "avg_pool1d": 1, "avg_pool2d": 2, "avg_pool3d": 3,
    "adaptive_avg_pool1d": 1, "adaptive_avg_pool2d": 2, "adaptive_avg_pool3d": 3,
}
# Ops whose output elements are input elements (or zeros): Rule.moves_values.
MOVES = ("view", "reshape", "permute", "transpose", "t", "flatten", "unflatten", "squeeze", "unsqueeze", "expand",
         "expand_as", "repeat", "repeat_interleave", "tile", "movedim", "narrow", "select", "index_select", "gather",
         "take_along_dim", "chunk", "split", "tensor_split", "unbind", "flip", "fliplr", "flipud", "roll", "rot90",
         "neg", "pixel_shuffle", "pixel_unshuffle", "pad", "diagonal", "tril", "triu", "real", "T", "mT",
         "as_strided", "slice", "index")
# Ops on each element alone (casts, negation): a stack goes through them as it is.
ELEMENTWISE = ("neg", "to", "float", "double", "half", "bfloat16", "type", "type_as", "real")
IDENTITY = ("contiguous", "clone", "detach", "dropout", "alpha_dropout", "feature_alpha_dropout",
            "dropout1d", "dropout2d", "dropout3d", "positive", "resolve_conj", "resolve_neg")
# Ops linear jointly in several operands (summands), with the argument positions of those.
SUMMANDS: dict[str, tuple[int, ...]] = {
    "add": (0, 1), "sub": (0, 1), "rsub": (0, 1), "where": (1, 2), "select_scatter": (0, 1),
    "slice_scatter": (0, 1), "diagonal_scatter": (0, 1), "index_put": (0, 2),
}
ADDITIVE = (*SUMMANDS, "cat", "stack", "hstack", "vstack")
SCATTERS = ("select_scatter", "slice_scatter", "diagonal_scatter", "index_put")


@register("linear", ops=STRUCTURAL)
class LinearRule(Rule):
    """The op is linear in its decomposed argument: apply it to every component (vmap)."""

    name = "linear"
    summable = True
    tangent = True
    # Only the first operand is linear: a decomposed divisor, grid, index or shape source is not.
    op_slots = MULTIPLICATIVE_SLOTS

    @property
    def moves_values(self) -> bool:
        return self.call.op in MOVES

    @classmethod
    def supports(cls, call: OpCall) -> bool:
        return super().supports(call) and call.n_decomposed == 1 and not cls.limitation(call)

    @classmethod
    def limitation(cls, call: OpCall) -> str:
        if call.n_decomposed != 1:
            return "more than one decomposed operand (a product: see the product rules)"
        if call.op == "pad":
            p = call.static((("input", None), ("pad", None), ("mode", "constant"), ("value", None)))
            if p["mode"] == "constant" and p["value"] not in (0, 0.0, None):
                return "padding with a nonzero constant is affine, not linear"
        return ""

    def forward(self, constants: Any, args: tuple, kwargs: dict) -> Any:
        spatial = _BATCH_FIRST.get(self.call.op)
        if spatial is not None and args and self.call.decomposed[0] and self.call.n_decomposed == 1:
            stack = args[0]
            # [K, N, C, *spatial]: fold the components into the batch axis (one kernel call, no
            # vmap permute-and-copy). Unbatched inputs ([K, C, *spatial]) take the vmap path.
            if stack.dim() >= 4 and (spatial == 0 or stack.dim() == spatial + 3):
                out = self.call.invoke((stack.flatten(0, 1), *args[1:]), kwargs)
                return out.unflatten(0, stack.shape[:2])
        if args and self.call.decomposed[0] and isinstance(args[0], torch.Tensor):
            out = self._at_once(args[0], args[1:], kwargs)
            if out is not None:
                return out
        elif len(args) == 2 and self.call.decomposed[1] and isinstance(args[1], torch.Tensor):
            out = self._constant_first(args[0], args[1], kwargs)
            if out is not None:
                return out
        if self.call.op == "view" and args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
            # A view that the model's own (contiguous) value allows may not fit each component of
            # a permuted stack (a transpose then .contiguous() that export records as a clone).
            args = (args[0].contiguous(), *args[1:])
        return self.vmap_call(args, kwargs)


    def _at_once(self, stack: torch.Tensor, rest: tuple, kwargs: dict) -> Any:
        """The op on the whole stack in one call (its first argument decomposed), or None."""
        op = self.call.op
        if op in ELEMENTWISE or (op == "div" and "rounding_mode" not in kwargs) or op == "mul":
            return self.call.invoke((stack, *rest), kwargs) if broadcasts(stack, *rest, *kwargs.values()) else None
        if op in ("matmul", "mm", "bmm") and len(rest) == 1 and not kwargs and isinstance(rest[0], torch.Tensor):
            return torch.matmul(stack, rest[0]) if matmul_broadcasts(stack, rest[0], stack_first=True) else None
        return on_stack(op, stack, rest, kwargs)

    def _constant_first(self, constant: Any, stack: torch.Tensor, kwargs: dict) -> Any:
        """``c * x`` or ``C @ x`` with the second operand decomposed, at once, or None."""
        op = self.call.op
        if op == "mul" and broadcasts(stack, constant, *kwargs.values()):
            return self.call.invoke((constant, stack), kwargs)
        if op in ("matmul", "mm", "bmm") and not kwargs and isinstance(constant, torch.Tensor):
            return torch.matmul(constant, stack) if matmul_broadcasts(stack, constant, stack_first=False) else None
        return None


@register("getitem", ops=("getitem",))
class GetItemRule(Rule):
    """``x[idx]``: picks a stack out of a multi-output node's tuple, or indexes every component."""

    name = "getitem"
    summable = True
    tangent = True
    moves_values = True
    slots = (0,)

    def forward(self, constants: Any, args: tuple, kwargs: dict) -> Any:
        container, index = args
        if isinstance(container, (tuple, list)):
            return container[index]
        out = on_stack("getitem", container, (index,), kwargs)
        return out if out is not None else self.vmap_call(args, kwargs)


@register("identity", ops=IDENTITY)
class IdentityRule(Rule):
    """Value-preserving ops (``clone``, ``contiguous``, dropout in eval): the stack passes.
    ``contiguous`` makes the stack contiguous, so every component is (a ``view`` may follow)."""

    name = "identity"
    summable = True
    moves_values = True

    @property
    def tangent(self) -> bool:
        return self.call.op != "detach"  # the same value, but no derivative

    def forward(self, constants: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        stack = first_decomposed(args, kwargs, self.call.decomposed)
        # contiguous (and clone, its torch.export spelling) make each component contiguous too
        return stack.contiguous() if self.call.op in ("contiguous", "clone") else stack


@register("copy", ops=("copy",))
class CopyRule(Rule):
    """``aten.copy(self, src)`` (a functionalised ``x[...] = src``): the value is ``src``, cast
    and broadcast to ``self``; ``self`` gives only its shape and dtype."""

    name = "copy"
    summable = True
    tangent = True
    slots = (0, 1, "self", "src")

    def forward(self, constants: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        p = bind((("self", None), ("src", None)), args, kwargs)
        target, source = p["self"], p["src"]
        decomposed = dict(zip(("self", "src"), self.call.decomposed))
        shape = target.shape[1:] if decomposed["self"] else target.shape
        k = (target if decomposed["self"] else source).shape[0]
        stack = source if decomposed["src"] else lift(source, BIAS, k)
        # Broadcast the original value's axes, not the component axis: [K, *src] -> [K, 1.., *src].
        stack = stack.reshape(k, *([1] * (len(shape) - stack.dim() + 1)), *stack.shape[1:])
        return stack.to(target.dtype).expand(k, *shape).clone()


class _Summand:
    """Marks a summand slot in an argument template."""


@register("additive", ops=ADDITIVE)
class AdditiveRule(Rule):
    """Sums, differences, concatenation, ``where``: decomposed operands add componentwise;
    a constant operand (context tensor or Python number) is the bias component's."""

    name = "additive"
    summable = True
    tangent = True
    slots = (0, "tensors")
    op_slots = {"add": (0, 1, "input", "other", "self"), "sub": (0, 1, "input", "other", "self"),
                "rsub": (0, 1, "input", "other", "self"), "where": (1, 2, "input", "other", "self"),
                "select_scatter": (0, 1, "input", "src"), "slice_scatter": (0, 1, "input", "src"),
                "diagonal_scatter": (0, 1, "input", "src"), "index_put": (0, 2, "input", "values")}

    def __init__(self, call: OpCall, options: Any):
        super().__init__(call, options)
        # Which leaves of the flattened (args, kwargs) are summands: constant summands are lifted
        # into the bias component; other leaves (``dim``, ``alpha``, the ``where`` condition) stay.
        # Mark summand slots with sentinels and flatten: the sentinels' positions are the leaves
        # to lift (positions stay valid at run time: the argument structure does not change).
        args = list(call.args)
        if call.op in SUMMANDS:
            slots = [(args, i) for i in SUMMANDS[call.op]]
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

    @property
    def moves_values(self) -> bool:
        return self.call.op in ("cat", "stack", "hstack", "vstack")

    @property
    def concatenates(self) -> bool:
        """A ``cat`` along one axis (pass ``structural_zeros`` reads it)."""
        return self.call.op == "cat"

    def forward(self, constants: Any, args: tuple, kwargs: dict) -> Any:
        if self.call.op == "add" and isinstance(args[0], (tuple, list)):
            return _concatenate_containers(args, self.call.args)
        if self.call.op in ("add", "sub") and len(args) == 2 and not kwargs:
            out = _plus_or_minus(self.call.op, *args, *self.call.decomposed)
            if out is not None:
                return out
        op, summands = self.as_function(args, kwargs, self.summand_positions)
        like = first_decomposed(args, kwargs, self.call.decomposed)
        flags = [self.call.decomposed[i] for i in self.summand_positions]
        lifted = [s if flag else as_bias_stack(s, like) for s, flag in zip(summands, flags)]
        if self.call.op in ("cat", "stack") and set(kwargs) <= {"tensors", "dim"}:
            dim = bind(_CAT, args, kwargs)["dim"]
            if isinstance(dim, int):  # the component axis stays in front
                return getattr(torch, self.call.op)(lifted, dim + 1 if dim >= 0 else dim)
        elif self.call.op in SUMMANDS and self.call.op not in SCATTERS:
            # Element-wise: the stacks broadcast against each other as their components do.
            lifted = aligned(lifted)
            others = [leaf for i, leaf in enumerate(pytree.tree_leaves((args, kwargs))) if i not in self.summand_positions]
            if broadcasts(lifted[0], *others):
                return op(*lifted)
        return torch.vmap(op)(*lifted)


def _plus_or_minus(op: str, x: Any, y: Any, x_decomposed: bool, y_decomposed: bool) -> torch.Tensor | None:
    """``x + y`` or ``x - y`` of stacks, or of a stack and a constant that goes to the bias
    component, at once; None where the constant would broadcast a component to a larger
    shape (the generic path handles that)."""
    if x_decomposed and y_decomposed:
        x, y = aligned([x, y])
        return x + y if op == "add" else x - y
    stack, constant = (x, y) if x_decomposed else (y, x)
    if isinstance(constant, torch.Tensor) and (constant.dtype != stack.dtype or not fits(constant.shape, stack.shape[1:])):
        return None
    out = stack.clone() if op == "add" or x_decomposed else -stack
    bias = out[BIAS]
    bias.sub_(constant) if op == "sub" and x_decomposed else bias.add_(constant)
    return out


def _concatenate_containers(args: tuple, template: tuple) -> tuple | list:
    """``(x,) + outs[1:]``: Python container concatenation. Entries that are context tensors
    (not stacks) become bias-only stacks, so every entry of the result is a stack."""
    k = next(len(entry) for arg, spec in zip(args, template) for entry, ref in _entries(arg, spec)
             if isinstance(ref, NodeRef) and ref.decomposed)
    parts = [type(arg)(entry if isinstance(ref, NodeRef) and ref.decomposed or not isinstance(entry, torch.Tensor)
                       else lift(entry, BIAS, k) for entry, ref in _entries(arg, spec)) for arg, spec in zip(args, template)]
    return parts[0] + parts[1]


def _entries(arg: Any, spec: Any) -> list[tuple[Any, Any]]:
    """Pairs (runtime entry, compile-time template) of a container operand; a container that is
    one node (``outs[1:]``) is all stacks."""
    if isinstance(spec, (tuple, list)):
        return list(zip(arg, spec))
    return [(entry, spec) for entry in arg]


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
    summable = True
    tangent = True
    slots = (0, "input")

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



# ---------------------------------------------------------------------------------------------
# An affine layer over a concatenation of undecomposed operands (pass ``structural_zeros``)
# ---------------------------------------------------------------------------------------------
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
    affine: "AffineRule", cat: "AdditiveRule", parts: list, owners: list[int], k: int, args: tuple, kwargs: dict
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


# Pass ``structural_zeros`` asks an affine rule for this, not for its class.
AffineRule.over_concatenation = staticmethod(sliced_affine)

__all__ = ["LinearRule", "GetItemRule", "IdentityRule", "AdditiveRule", "AffineRule", "sliced_affine"]
