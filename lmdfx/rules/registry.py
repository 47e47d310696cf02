"""The rule registry: canonical op -> rule family -> variant, and the ``Rules`` presets.

A family groups ops that share a decomposition choice (all element-wise activations share
``Rules.activation``). Adding a rule for a new op means registering its canonical name in the
module that implements the family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import LMDError
from .base import OpCall, Rule

FAMILIES: dict[str, dict[str, type[Rule]]] = {}
OPS: dict[str, str] = {}

# Families whose variant the user chooses, and the ``Rules`` field that chooses it.
CHOICES: dict[str, str] = {
    "activation": "activation",
    "batchnorm": "batchnorm",
    "norm": "norm",
    "product": "product",
    "softmax": "softmax",
    # Attention ops freeze or decompose their softmax weights like a softmax node does.
    "sdpa": "softmax",
    "multihead_attention": "softmax",
}

# Ops that multiply their operands: linear when one operand is decomposed, a product when two are.
MULTILINEAR = {"mul", "matmul", "mm", "bmm", "einsum", "outer", "tensordot", "dot"}


def register(family: str, variant: str = "default", ops: tuple[str, ...] = ()):
    """Class decorator: register a rule as ``variant`` of ``family`` and map ``ops`` to it."""

    def decorate(cls: type[Rule]) -> type[Rule]:
        FAMILIES.setdefault(family, {})[variant] = cls
        for op in ops:
            OPS[op] = family
        return cls

    return decorate


@dataclass(frozen=True)
class Rules:
    """Which rule each layer family uses (DESIGN §1). Defaults are the paper's.

    ``overrides`` maps a module qualified name, a module type, or a canonical op name (e.g.
    ``"relu"``) to a variant name (``"tangent"``, ``"taylor"``, ...) or to a ``Rule`` subclass.
    Lookups go module name, then module type, then op.
    """

    activation: str = "secant"
    bias_split: str = "none"
    batchnorm: str = "identity"
    norm: str = "ratio"
    product: str = "shapley"
    softmax: str = "freeze"
    fallback: str = "error"
    eps: float = 1e-6
    overrides: Mapping[Any, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        allowed = {
            "activation": ("secant", "tangent"),
            "bias_split": ("none", "sum", "ratio"),
            "batchnorm": ("identity", "uniform"),
            "norm": ("ratio", "identity", "uniform"),
            "product": ("shapley", "freeze"),
            "softmax": ("freeze", "secant"),
            "fallback": ("error", "taylor"),
        }
        for name, choices in allowed.items():
            value = getattr(self, name)
            if value not in choices:
                raise LMDError(
                    f"Rules({name}={value!r}) is not a known choice; use one of {', '.join(choices)}."
                )
        if not self.eps > 0:
            raise LMDError(f"Rules(eps={self.eps!r}) must be a positive number.")


def family_of(call: OpCall) -> str | None:
    """The rule family of a mixed node, or None when no family covers its op."""
    family = OPS.get(call.op)
    if call.op in MULTILINEAR:
        return "product" if call.n_decomposed >= 2 else "linear"
    return family


def _override_for(call: OpCall, overrides: Mapping[Any, Any]) -> Any:
    # Module names and types match only the node that is that module's call, not every op
    # traced inside its forward.
    module_type = type(call.module) if call.module is not None else call.extra.get("module_type")
    keys = [call.layer, module_type] if module_type is not None else []
    for key in (*keys, call.op):
        if key in overrides:
            return overrides[key]
    return None


def resolve(call: OpCall, rules: Rules) -> Rule | None:
    """The rule for a mixed node under ``rules``, or None if the op is unsupported."""
    override = _override_for(call, rules.overrides)
    if isinstance(override, type) and issubclass(override, Rule):
        return override(call, rules)
    if override == "taylor" or (override is None and family_of(call) is None and rules.fallback == "taylor"):
        return FAMILIES["taylor"]["default"](call, rules)
    family = family_of(call)
    if family is None:
        return None
    variants = FAMILIES[family]
    variant = override or (getattr(rules, CHOICES[family]) if family in CHOICES else "default")
    if variant not in variants:
        raise LMDError(
            f"Rule override {variant!r} for node {call.node!r} (module {call.layer or '<top level>'!r}, "
            f"op {call.op!r}, family {family!r}) "
            f"is unknown; this family has: {', '.join(sorted(variants))}, or 'taylor'."
        )
    cls = variants[variant]
    if not cls.supports(call):
        if rules.fallback == "taylor":
            return FAMILIES["taylor"]["default"](call, rules)
        return None
    return cls(call, rules)
