"""Attention: ``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``, and the
``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` / ``nn.TransformerEncoder`` /
``nn.TransformerDecoder`` leaves (the attention module's ``(output, weights)`` tuple is picked
apart by the ``getitem`` rule in ``linear``).

Attention variants follow ``Rules.softmax``:

- ``freeze`` (default): the attention weights P are operating-point constants (computed from the
  reference queries and keys, masks included), so the output P·V is linear in V: every
  component of V goes through P, the value-projection and output-projection biases go to the
  bias component. Query and key components do not reach the output (their effect is in the
  frozen P). Returned weights (``need_weights``) are P, wholly in the bias component.
- ``secant``: the explicit math is decomposed: S = scale·Q·Kᵀ through the product rule
  (``Rules.product``; ``freeze`` takes the bias-only operand, else Kᵀ, as a constant), additive masks to the bias component, P = softmax(S) by the secant slope
  of the ``softmax`` secant rule, (P − P₀) / S per element with P₀ = softmax at S = 0 (uniform
  over the unmasked keys), P₀ and the remainder to the bias, masked positions slope 0; then P·V
  through the product rule again (``freeze``: V constant). Returned weights are the decomposed P.

Every rule adds the rounding difference between the original op (a fused kernel) and its
re-computation to the bias component, so components sum to the op's own output.

The transformer-layer rules are composites: they run the layer's math sub-op by sub-op and give
every LayerNorm, activation, attention (and, in a stack, layer) sub-op the rule the registry
resolves for it under the user's ``Rules`` (overrides by ``"<layer>.norm1"``-style names,
module types and ops included).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import LMDError
from ..ops import MODULE_CONVERTERS
from .base import BIAS, NodeRef, OpCall, Rule, add_to_bias, bind, lift
from .registry import register, resolve

# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------


class _Tape:
    """Constants of a multi-step rule: computed while recording (the operating-point pass),
    read back otherwise (the stored or frozen operating point)."""

    def __init__(self, constants: dict | None):
        self.recording = constants is None
        self.constants: dict = {} if constants is None else constants

    def __call__(self, key: str, compute: Callable[[], Any]) -> Any:
        if self.recording:
            self.constants[key] = compute()
        return self.constants[key]


def _flags(call: OpCall, params: tuple[tuple[str, Any], ...], names: tuple[str, ...]) -> dict[str, bool]:
    """Which of the named parameters of ``call`` arrive decomposed (as stacks)."""
    bound = call.static(params)
    return {n: isinstance(bound[n], NodeRef) and bound[n].decomposed for n in names}


def _bilinear(op: Callable, x: torch.Tensor, y: torch.Tensor, mode: str, tape: _Tape, key: str) -> torch.Tensor:
    """op(x, y) for two stacks, bilinear in them, as the ``product`` rules do it: ``shapley``
    splits cross terms half-half; ``freeze`` takes one operand at the operating point — the
    one wholly in the bias component (e.g. learned queries in Q·Kᵀ), else the second."""
    if mode in ("freeze", "gate"):  # as the product rules: the bias-only operand, else the second
        first = tape(f"{key}.first", lambda: not bool(x[:BIAS].any()) and bool(y[:BIAS].any()))
        if first:
            return torch.vmap(op, in_dims=(None, 0))(tape(key, lambda: x.sum(0)), y)
        return torch.vmap(op, in_dims=(0, None))(x, tape(key, lambda: y.sum(0)))
    x_half = 0.5 * x[:BIAS].sum(0) + x[BIAS]
    y_half = 0.5 * y[:BIAS].sum(0) + y[BIAS]
    modal = torch.vmap(op, in_dims=(0, None))(x[:BIAS], y_half) + torch.vmap(op, in_dims=(None, 0))(x_half, y[:BIAS])
    return torch.cat([modal, op(x[BIAS], y[BIAS]).unsqueeze(0)])


def _matmul_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b.transpose(-2, -1)


def _softmax_secant(tape: _Tape, key: str, logits: torch.Tensor, additive: torch.Tensor | None,
                    weights: Callable[[torch.Tensor], torch.Tensor], eps: float) -> torch.Tensor:
    """softmax over the last axis of a stack of logits by the ``softmax`` secant rule: slope
    (P − P₀) / S per element, P₀ = softmax at S = 0, P₀ and the remainder to the bias.
    ``additive`` (a mask, -inf where masked) is the bias component's; masked positions get
    slope 0 (P is 0 there)."""
    masked = None
    if additive is not None:
        masked = torch.isinf(additive)
        logits = add_to_bias(logits, torch.where(masked, torch.zeros_like(additive), additive))

    def constants() -> dict:
        total = logits.sum(0)  # the reference logits, float masks included
        reference = total if masked is None else total.masked_fill(masked, -math.inf)
        p = weights(reference)
        zero = torch.zeros_like(total)
        at_zero = weights(zero if masked is None else zero.masked_fill(masked, -math.inf))
        dropped = torch.isinf(reference)
        large = (total.abs() > eps) & ~dropped
        safe = torch.where(large, total, torch.ones_like(total))
        slope = torch.where(large, (p - at_zero) / safe, torch.zeros_like(p))
        return {"slope": slope, "remainder": p - slope * total}

    c = tape(key, constants)
    return add_to_bias(logits * c["slope"], c["remainder"])


def _sdpa_additive(attn_mask: torch.Tensor | None, is_causal: bool, length: int, source: int,
                   like: torch.Tensor) -> torch.Tensor | None:
    """The additive mask (-inf where attention is not allowed) of ``F.scaled_dot_product_attention``."""
    additive = None
    if is_causal:
        allowed = torch.ones(length, source, dtype=torch.bool, device=like.device).tril()
        additive = torch.zeros(length, source, dtype=like.dtype, device=like.device).masked_fill(~allowed, -math.inf)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:  # sdpa: True = takes part
            mask = torch.zeros_like(attn_mask, dtype=like.dtype).masked_fill(~attn_mask, -math.inf)
        else:
            mask = attn_mask.to(like.dtype)
        additive = mask if additive is None else additive + mask
    return additive


# ---------------------------------------------------------------------------------------------
# F.scaled_dot_product_attention
# ---------------------------------------------------------------------------------------------

_SDPA = (("query", None), ("key", None), ("value", None), ("attn_mask", None), ("dropout_p", 0.0),
         ("is_causal", False), ("scale", None), ("enable_gqa", False))


class _SDPARule(Rule):
    has_operating_point = True
    slots = (0, 1, 2, "query", "key", "value")

    def __init__(self, call: OpCall, options: Any):
        super().__init__(call, options)
        p = call.static(_SDPA)
        if isinstance(p["dropout_p"], NodeRef) or p["dropout_p"]:
            raise LMDError(
                f"scaled_dot_product_attention at {call.source or call.node} has dropout_p="
                f"{p['dropout_p']!r}: it drops weights at random even in eval mode. Pass "
                "dropout_p=(self.p if self.training else 0.0) so the traced eval model uses 0."
            )
        if isinstance(p["is_causal"], NodeRef) or isinstance(p["scale"], NodeRef):
            raise LMDError(f"scaled_dot_product_attention at {call.source or call.node}: is_causal and scale "
                           "must be Python constants; fix them via compile(..., concrete_args=...).")

    def _operands(self, args: tuple, kwargs: dict) -> dict:
        p = bind(_SDPA, args, kwargs)
        return {**p, "flags": _flags(self.call, _SDPA, ("query", "key", "value"))}

    def _components(self, p: dict) -> int:
        return next(p[n] for n in ("query", "key", "value") if p["flags"][n]).shape[0]

    @staticmethod
    def _gqa(p: dict, t: torch.Tensor, heads: int) -> torch.Tensor:
        if p["enable_gqa"] and t.shape[-3] != heads:
            return t.repeat_interleave(heads // t.shape[-3], dim=-3)
        return t

    def _scale(self, p: dict, q: torch.Tensor) -> float:
        return p["scale"] if p["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])

    def _stacks(self, p: dict, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as stacks (a constant operand becomes a bias-only stack)."""
        return tuple(p[n] if p["flags"][n] else lift(p[n], BIAS, k) for n in ("query", "key", "value"))


@register("sdpa", "freeze", ops=("scaled_dot_product_attention",))
class SDPAFreezeRule(_SDPARule):
    """Attention weights frozen at the operating point; the output is P·V per component of V."""

    name = "freeze"

    def operating_point(self, out, args, kwargs, stacked_args, stacked_kwargs):
        p = bind(_SDPA, args, kwargs)
        q, key, v = p["query"], p["key"], p["value"]
        key = self._gqa(p, key, q.shape[-3]) if q.dim() >= 3 else key
        v = self._gqa(p, v, q.shape[-3]) if q.dim() >= 3 else v
        logits = _matmul_t(q, key) * self._scale(p, q)
        additive = _sdpa_additive(p["attn_mask"], p["is_causal"], q.shape[-2], key.shape[-2], q)
        weights = torch.softmax(logits if additive is None else logits + additive, dim=-1)
        return {"weights": weights, "remainder": out - weights @ v}

    def forward(self, constants: dict, args: tuple, kwargs: dict) -> torch.Tensor:
        p = self._operands(args, kwargs)
        weights = constants["weights"]
        v = p["value"] if p["flags"]["value"] else lift(p["value"], BIAS, self._components(p))
        v = self._gqa(p, v, weights.shape[-3]) if weights.dim() >= 3 else v
        return add_to_bias(weights @ v, constants["remainder"])


@register("sdpa", "secant")
class SDPASecantRule(_SDPARule):
    """S = scale·Q·Kᵀ and P·V through the product rule, softmax by the secant slope."""

    name = "secant"

    @property
    def separates(self) -> bool:
        return self.options.product in ("freeze", "gate")

    def _run(self, tape: _Tape, p: dict, k: int) -> torch.Tensor:
        q, key, v = self._stacks(p, k)
        heads = q.shape[-3] if q.dim() >= 4 else None
        if heads is not None:
            key, v = self._gqa(p, key, heads), self._gqa(p, v, heads)
        logits = _bilinear(_matmul_t, q, key, self.options.product, tape, "key") * self._scale(p, q)
        additive = tape("additive", lambda: _sdpa_additive(p["attn_mask"], p["is_causal"], q.shape[-2],
                                                           key.shape[-2], q))
        weights = _softmax_secant(tape, "softmax", logits, additive, lambda s: torch.softmax(s, -1),
                                  self.options.eps)
        return _bilinear(torch.matmul, weights, v, self.options.product, tape, "value")

    def operating_point(self, out, args, kwargs, stacked_args, stacked_kwargs):
        p = self._operands(stacked_args, stacked_kwargs)
        p["attn_mask"] = bind(_SDPA, args, kwargs)["attn_mask"]  # the reference mask, not a stack
        tape = _Tape(None)
        stack = self._run(tape, p, self._components(p))
        tape.constants["remainder"] = out - stack.sum(0)
        return tape.constants

    def forward(self, constants: dict, args: tuple, kwargs: dict) -> torch.Tensor:
        p = self._operands(args, kwargs)
        return add_to_bias(self._run(_Tape(constants), p, self._components(p)), constants["remainder"])


# ---------------------------------------------------------------------------------------------
# nn.MultiheadAttention
# ---------------------------------------------------------------------------------------------

_MHA = (("query", None), ("key", None), ("value", None), ("key_padding_mask", None), ("need_weights", True),
        ("attn_mask", None), ("average_attn_weights", True), ("is_causal", False))


def _mha_additive(module: nn.MultiheadAttention, key_padding_mask: torch.Tensor | None,
                  attn_mask: torch.Tensor | None, batch: int, length: int, source: int,
                  like: torch.Tensor) -> torch.Tensor | None:
    """The additive mask [B, H, L, S'] of ``nn.MultiheadAttention`` (bool True = masked), with the
    extra columns of ``add_bias_kv`` / ``add_zero_attn`` unmasked, as the module pads them."""

    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros_like(mask, dtype=like.dtype).masked_fill(mask, -math.inf)
        return mask.to(like.dtype)

    heads = module.num_heads
    total = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        mask = mask.view(1, 1, length, source) if mask.dim() == 2 else mask.view(batch, heads, length, source)
        total = mask
    if key_padding_mask is not None:
        mask = additive(key_padding_mask).view(batch, 1, 1, source)
        total = mask if total is None else total + mask
    if total is None:
        return None
    extra = int(module.bias_k is not None) + int(module.add_zero_attn)
    return F.pad(total, (0, extra)) if extra else total


def _projections(module: nn.MultiheadAttention) -> tuple[torch.Tensor, ...]:
    e = module.embed_dim
    if module._qkv_same_embed_dim:
        wq, wk, wv = module.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    if module.in_proj_bias is not None:
        bq, bk, bv = module.in_proj_bias[:e], module.in_proj_bias[e:2 * e], module.in_proj_bias[2 * e:]
    else:
        bq = bk = bv = None
    return wq, wk, wv, bq, bk, bv


def _affine(stack: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = F.linear(stack, weight)
    return out if bias is None else add_to_bias(out, bias)


def _append_token(stack: torch.Tensor, token: torch.Tensor | None, zero: bool) -> torch.Tensor:
    """Append ``bias_k``/``bias_v`` (bias component) and the ``add_zero_attn`` zeros along the
    sequence axis of a [K, B, S, E] stack."""
    k, b, _, e = stack.shape
    if token is not None:
        stack = torch.cat([stack, lift(token.reshape(1, 1, e).expand(b, 1, e), BIAS, k)], dim=2)
    if zero:
        stack = torch.cat([stack, stack.new_zeros(k, b, 1, e)], dim=2)
    return stack


def _heads(stack: torch.Tensor, heads: int) -> torch.Tensor:
    """[K, B, S, E] -> [K, B, H, S, E/H]."""
    k, b, s, e = stack.shape
    return stack.view(k, b, s, heads, e // heads).transpose(2, 3)


class _MHARule(Rule):
    has_operating_point = True
    slots = (0, 1, 2, "query", "key", "value")

    def __init__(self, call: OpCall, options: Any):
        super().__init__(call, options)
        self.flags = _flags(call, _MHA, ("query", "key", "value"))

    @classmethod
    def supports(cls, call: OpCall) -> bool:
        return super().supports(call) and isinstance(call.module, nn.MultiheadAttention)

    def _components(self, p: dict) -> int:
        return next(p[n] for n in ("query", "key", "value") if self.flags[n]).shape[0]

    def _layout(self, p: dict, k: int) -> tuple[list[torch.Tensor], bool]:
        """q, k, v as [K, B, S, E] stacks; whether the input was unbatched."""
        module = self.call.module
        tensors = []
        unbatched = None
        for name in ("query", "key", "value"):
            t = p[name]
            t = t if self.flags[name] else lift(t, BIAS, k)
            if unbatched is None:
                unbatched = t.dim() == 3
            if unbatched:
                t = t.unsqueeze(1)  # [K, S, E] -> [K, 1, S, E]: a batch of one
            elif not module.batch_first:
                t = t.transpose(1, 2)
            tensors.append(t)
        return tensors, bool(unbatched)

    def _restore(self, stack: torch.Tensor, unbatched: bool) -> torch.Tensor:
        if unbatched:
            return stack[:, 0]
        return stack if self.call.module.batch_first else stack.transpose(1, 2)

    def _weights_out(self, p: dict, weights: torch.Tensor, unbatched: bool) -> torch.Tensor | None:
        """The module's returned weights (stack) from the per-head weights [K, B, H, L, S]."""
        if not p["need_weights"]:
            return None
        if p["average_attn_weights"]:
            weights = weights.mean(2)
        return weights[:, 0] if unbatched else weights

    def _run(self, tape: _Tape, p: dict, k: int, reference: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def operating_point(self, out, args, kwargs, stacked_args, stacked_kwargs):
        reference = bind(_MHA, args, kwargs)
        p = bind(_MHA, stacked_args, stacked_kwargs)
        tape = _Tape(None)
        stack, _ = self._run(tape, p, self._components(p), reference)
        tape.constants["remainder"] = out[0] - stack.sum(0)
        return tape.constants

    def forward(self, constants: dict, args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any]:
        p = bind(_MHA, args, kwargs)
        stack, weights = self._run(_Tape(constants), p, self._components(p), {})
        return add_to_bias(stack, constants["remainder"]), weights

    def _output(self, attended: torch.Tensor, unbatched: bool) -> torch.Tensor:
        """[K, B, H, L, E/H] -> out_proj -> the module's layout."""
        module = self.call.module
        kk, b, h, length, d = attended.shape
        merged = attended.transpose(2, 3).reshape(kk, b, length, h * d)
        out = _affine(merged, module.out_proj.weight, module.out_proj.bias)
        return self._restore(out, unbatched)


@register("multihead_attention", "freeze", ops=("MultiheadAttention",))
class MHAFreezeRule(_MHARule):
    """Per-head weights frozen at the operating point; V's components go through the value
    projection, P and the output projection; projection biases go to the bias component."""

    name = "freeze"

    def _run(self, tape, p, k, reference):
        module = self.call.module

        def weights() -> torch.Tensor:
            _, w = module(reference["query"], reference["key"], reference["value"],
                          key_padding_mask=reference["key_padding_mask"], need_weights=True,
                          attn_mask=reference["attn_mask"], average_attn_weights=False)
            return w

        w = tape("weights", weights)
        (_, _, v), unbatched = self._layout(p, k)
        _, _, wv, _, _, bv = _projections(module)
        v = _append_token(_affine(v, wv, bv), module.bias_v, module.add_zero_attn)
        per_head = w.unsqueeze(0) if unbatched else w  # [B, H, L, S']
        attended = per_head.unsqueeze(0) @ _heads(v, module.num_heads)
        stack = self._output(attended, unbatched)
        returned = None
        if p["need_weights"]:
            returned = self._weights_out(p, lift(per_head, BIAS, k), unbatched)
        return stack, returned


@register("multihead_attention", "secant")
class MHASecantRule(_MHARule):
    """The module's math decomposed: projections (biases to the bias), S = Q·Kᵀ/√d and P·V
    through ``Rules.product``, softmax by the secant slope, masks to the bias component."""

    name = "secant"

    @property
    def separates(self) -> bool:
        return self.options.product in ("freeze", "gate")

    def _run(self, tape, p, k, reference):
        module = self.call.module
        (q, key, v), unbatched = self._layout(p, k)
        wq, wk, wv, bq, bk, bv = _projections(module)
        heads = module.num_heads
        q = _heads(_affine(q, wq, bq), heads)
        key = _heads(_append_token(_affine(key, wk, bk), module.bias_k, module.add_zero_attn), heads)
        v = _heads(_append_token(_affine(v, wv, bv), module.bias_v, module.add_zero_attn), heads)
        scale = 1.0 / math.sqrt(q.shape[-1])
        logits = _bilinear(_matmul_t, q, key, self.options.product, tape, "key") * scale
        batch, length = q.shape[1], q.shape[3]

        def additive() -> torch.Tensor | None:
            source = key.shape[3] - int(module.bias_k is not None) - int(module.add_zero_attn)
            return _mha_additive(module, reference["key_padding_mask"], reference["attn_mask"], batch,
                                 length, source, logits)

        weights = _softmax_secant(tape, "softmax", logits, tape("additive", additive),
                                  lambda s: torch.softmax(s, -1), self.options.eps)
        attended = _bilinear(torch.matmul, weights, v, self.options.product, tape, "value")
        return self._output(attended, unbatched), self._weights_out(p, weights, unbatched)


# ---------------------------------------------------------------------------------------------
# nn.Transformer{Encoder,Decoder}Layer and nn.Transformer{Encoder,Decoder} (fx leaves)
# ---------------------------------------------------------------------------------------------

_ENCODER_LAYER = (("src", None), ("src_mask", None), ("src_key_padding_mask", None), ("is_causal", False))
_DECODER_LAYER = (("tgt", None), ("memory", None), ("tgt_mask", None), ("memory_mask", None),
                  ("tgt_key_padding_mask", None), ("memory_key_padding_mask", None), ("tgt_is_causal", False),
                  ("memory_is_causal", False))
_INPUT = NodeRef("input", True)
_CONSTANT = NodeRef("constant", False)


def _sub_call(parent: OpCall, name: str, kind: str, target: Any, op: str, args: tuple, kwargs: dict,
              module: nn.Module | None = None, module_type: type | None = None) -> OpCall:
    """The OpCall of a sub-op of a composite layer, named ``<layer>.<name>`` for overrides."""
    leaves, _ = pytree.tree_flatten((args, kwargs))
    return OpCall(kind=kind, target=target, op=op, node=f"{parent.node}.{name}", layer=f"{parent.layer}.{name}",
                  decomposed=tuple(isinstance(leaf, NodeRef) and leaf.decomposed for leaf in leaves),
                  args=args, kwargs=kwargs, module=module, source=parent.source,
                  extra={"module_type": module_type})


def _activation_call(parent: OpCall, activation: Any) -> tuple[OpCall, dict]:
    """The activation of a transformer layer (a function or an ``nn`` module) as a sub-op."""
    kwargs: dict = {}
    module_type = None
    fn = activation
    if isinstance(activation, nn.Module):
        convert = MODULE_CONVERTERS.get(type(activation))
        converted = convert(activation) if convert is not None else None
        if converted is None or converted[1]:
            raise LMDError(f"{parent.layer}: activation {type(activation).__name__} is not supported inside a "
                           "transformer layer rule; use a torch.nn.functional activation (F.relu, F.gelu).")
        fn, _, kwargs = converted
        module_type = type(activation)
    name = getattr(fn, "__name__", type(fn).__name__)
    return _sub_call(parent, "activation", "call_function", fn, name.rstrip("_"), (_INPUT,), kwargs,
                     module_type=module_type), kwargs


def _norm_call(parent: OpCall, name: str, norm: nn.LayerNorm) -> OpCall:
    weight = _CONSTANT if norm.weight is not None else None
    bias = _CONSTANT if getattr(norm, "bias", None) is not None else None
    return _sub_call(parent, name, "call_function", F.layer_norm, "layer_norm", (_INPUT,),
                     {"normalized_shape": tuple(norm.normalized_shape), "weight": weight, "bias": bias,
                      "eps": norm.eps}, module_type=type(norm))


class _Composite(Rule):
    """A leaf module run sub-op by sub-op, each sub-op with the rule the registry resolves for it.

    Recording (the operating-point pass) runs the reference values and the stacks side by side
    and stores every sub-rule's constants; replaying runs the stacks on stored constants. The
    rounding difference to the module's own output goes to the bias component.
    """

    has_operating_point = True
    params: tuple = ()
    inputs: tuple[str, ...] = ()

    @property
    def separates(self) -> bool:
        return all(rule.separates for rule in self.sub.values())

    def __init__(self, call: OpCall, options: Any):
        super().__init__(call, options)
        self.flags = _flags(call, self.params, self.inputs)
        self.sub = nn.ModuleDict()

    def _add(self, sub: OpCall, name: str) -> None:
        rule = resolve(sub, self.options)
        if rule is None:
            raise LMDError(
                f"{sub.layer}: sub-op {sub.op!r} of {type(self.call.module).__name__} has no decomposition "
                "rule; use lmdfx.Rules(fallback='taylor') or an override for that name."
            )
        self.sub[name] = rule

    def _step(self, tape: _Tape, name: str, x: tuple, kwargs: dict | None = None,
              extra_stacks: tuple = (), extra_refs: tuple = ()) -> tuple:
        """Run sub-op ``name`` on a (reference, stack) pair (reference None when replaying)."""
        rule = self.sub[name]
        kwargs = kwargs or {}
        ref, stack = x
        stack_args = (stack, *extra_stacks)
        if tape.recording:
            ref_args = (ref, *extra_refs)
            out = rule.call.invoke(ref_args, kwargs)
            constants = rule.operating_point(out, ref_args, kwargs, stack_args, kwargs) \
                if rule.has_operating_point else None
            tape.constants[name] = constants
        else:
            out, constants = None, tape.constants[name]
        result = rule(constants, stack_args, kwargs)
        if isinstance(result, tuple):  # attention: (output, weights)
            return (None if out is None else out[0]), result[0]
        return out, result

    def _norm(self, tape: _Tape, name: str, x: tuple, module: nn.Module | None = None) -> tuple:
        norm = getattr(module if module is not None else self.call.module, name)
        kwargs = {"normalized_shape": tuple(norm.normalized_shape), "weight": norm.weight,
                  "bias": getattr(norm, "bias", None), "eps": norm.eps}
        return self._step(tape, name, x, kwargs=kwargs)

    def _inputs(self, p: dict) -> dict[str, torch.Tensor]:
        k = next(p[n] for n in self.inputs if self.flags[n]).shape[0]
        return {n: p[n] if self.flags[n] else lift(p[n], BIAS, k) for n in self.inputs}

    def _run(self, tape: _Tape, stacks: dict, refs: dict, p: dict) -> torch.Tensor:
        raise NotImplementedError

    def operating_point(self, out, args, kwargs, stacked_args, stacked_kwargs):
        reference = bind(self.params, args, kwargs)
        stacks = self._inputs(bind(self.params, stacked_args, stacked_kwargs))
        tape = _Tape(None)
        stack = self._run(tape, stacks, {n: reference[n] for n in self.inputs}, reference)
        tape.constants["remainder"] = out - stack.sum(0)
        return tape.constants

    def forward(self, constants: dict, args: tuple, kwargs: dict) -> torch.Tensor:
        p = bind(self.params, args, kwargs)
        # Masks only shape the frozen attention weights: not needed when replaying.
        stack = self._run(_Tape(constants), self._inputs(p), {n: None for n in self.inputs}, {})
        return add_to_bias(stack, constants["remainder"])


def _linear(x: tuple, linear: nn.Linear) -> tuple:
    ref, stack = x
    return (None if ref is None else linear(ref)), _affine(stack, linear.weight, linear.bias)


def _add_pair(a: tuple, b: tuple) -> tuple:
    return (None if a[0] is None else a[0] + b[0]), a[1] + b[1]


@register("transformer_layer", ops=("TransformerEncoderLayer", "TransformerDecoderLayer"))
class TransformerLayerRule(_Composite):
    """``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` (pre- or post-norm) as the
    composition of their sub-ops: LayerNorm (``Rules.norm``), self/cross attention (the
    ``multihead_attention`` rule, ``Rules.softmax``), linear1 -> activation (``Rules.activation``)
    -> linear2, residual adds. Masks are reference values: they only shape the attention weights."""

    name = "transformer_layer"

    def __init__(self, call: OpCall, options: Any):
        decoder = call.op == "TransformerDecoderLayer"
        self.params = _DECODER_LAYER if decoder else _ENCODER_LAYER
        self.inputs = ("tgt", "memory") if decoder else ("src",)
        super().__init__(call, options)
        module = call.module
        for name in ("norm1", "norm2", "norm3"):
            if getattr(module, name, None) is not None:
                self._add(_norm_call(call, name, getattr(module, name)), name)
        for name in ("self_attn", "multihead_attn"):
            attention = getattr(module, name, None)
            if attention is not None:
                self._add(_sub_call(call, name, "call_module", attention, "MultiheadAttention",
                                    (_INPUT, _INPUT, _INPUT),
                                    {"attn_mask": None, "key_padding_mask": None, "need_weights": False},
                                    module=attention, module_type=type(attention)), name)
        activation, self.activation_kwargs = _activation_call(call, module.activation)
        self._add(activation, "activation")

    slots = (0, 1, "src", "tgt", "memory")

    @classmethod
    def supports(cls, call: OpCall) -> bool:
        return super().supports(call) and isinstance(call.module, (nn.TransformerEncoderLayer,
                                                                   nn.TransformerDecoderLayer))

    def _attention(self, tape: _Tape, name: str, x: tuple, memory: tuple, mask: Any, padding: Any) -> tuple:
        kwargs = {"attn_mask": mask, "key_padding_mask": padding, "need_weights": False}
        return self._step(tape, name, x, kwargs=kwargs, extra_stacks=(memory[1], memory[1]),
                          extra_refs=(memory[0], memory[0]))

    def _feed_forward(self, tape: _Tape, x: tuple) -> tuple:
        module = self.call.module
        h = _linear(x, module.linear1)
        h = self._step(tape, "activation", h, kwargs=self.activation_kwargs)
        return _linear(h, module.linear2)

    def _run(self, tape, stacks, refs, p):
        module = self.call.module
        decoder = "tgt" in self.inputs
        x = (refs[self.inputs[0]], stacks[self.inputs[0]])
        memory = (refs["memory"], stacks["memory"]) if decoder else None
        sa_mask = p.get("tgt_mask" if decoder else "src_mask")
        sa_padding = p.get("tgt_key_padding_mask" if decoder else "src_key_padding_mask")

        def self_attention(h: tuple) -> tuple:
            return self._attention(tape, "self_attn", h, h, sa_mask, sa_padding)

        def cross_attention(h: tuple) -> tuple:
            return self._attention(tape, "multihead_attn", h, memory, p.get("memory_mask"),
                                   p.get("memory_key_padding_mask"))

        blocks = [("norm1", self_attention)]
        if decoder:
            blocks.append(("norm2", cross_attention))
        blocks.append(("norm3" if decoder else "norm2", lambda h: self._feed_forward(tape, h)))
        for norm, block in blocks:
            if module.norm_first:
                x = _add_pair(x, block(self._norm(tape, norm, x)))
            else:
                x = self._norm(tape, norm, _add_pair(x, block(x)))
        return x[1]


_ENCODER = (("src", None), ("mask", None), ("src_key_padding_mask", None), ("is_causal", None))
_DECODER = _DECODER_LAYER[:6] + (("tgt_is_causal", None), ("memory_is_causal", False))


@register("transformer_stack", ops=("TransformerEncoder", "TransformerDecoder"))
class TransformerStackRule(_Composite):
    """``nn.TransformerEncoder`` / ``nn.TransformerDecoder``: their layers one after the other
    (each by the ``transformer_layer`` rule), then the optional final LayerNorm."""

    name = "transformer_stack"

    def __init__(self, call: OpCall, options: Any):
        decoder = call.op == "TransformerDecoder"
        self.params = _DECODER if decoder else _ENCODER
        self.inputs = ("tgt", "memory") if decoder else ("src",)
        super().__init__(call, options)
        module = call.module
        layer_inputs = (_INPUT, _INPUT) if decoder else (_INPUT,)
        for i, layer in enumerate(module.layers):
            self._add(_sub_call(call, f"layers.{i}", "call_module", layer, type(layer).__name__, layer_inputs, {},
                                module=layer, module_type=type(layer)), f"layers.{i}".replace(".", "_"))
        if module.norm is not None:
            self._add(_norm_call(call, "norm", module.norm), "norm")

    slots = (0, 1, "src", "tgt", "memory")

    @classmethod
    def supports(cls, call: OpCall) -> bool:
        return super().supports(call) and isinstance(call.module, (nn.TransformerEncoder, nn.TransformerDecoder))

    def _run(self, tape, stacks, refs, p):
        module = self.call.module
        decoder = "tgt" in self.inputs
        x = (refs[self.inputs[0]], stacks[self.inputs[0]])
        if decoder:
            kwargs = {n: p.get(n) for n in ("tgt_mask", "memory_mask", "tgt_key_padding_mask",
                                             "memory_key_padding_mask")}
            extra = {"extra_stacks": (stacks["memory"],), "extra_refs": (refs["memory"],)}
        else:
            kwargs = {"src_mask": p.get("mask"), "src_key_padding_mask": p.get("src_key_padding_mask")}
            extra = {}
        for i in range(len(module.layers)):
            x = self._step(tape, f"layers_{i}", x, kwargs=kwargs, **extra)
        if module.norm is not None:
            x = self._norm(tape, "norm", x)
        return x[1]


__all__ = [
    "MHAFreezeRule",
    "MHASecantRule",
    "SDPAFreezeRule",
    "SDPASecantRule",
    "TransformerLayerRule",
    "TransformerStackRule",
]
