"""The rule registry: canonical op -> candidate rule families -> variants, and the ``Rules`` presets.

A family groups ops that share a decomposition choice (all element-wise activations share
``Rules.activation``). Each rule class declares which argument positions of an op it can
decompose (``Rule.slots`` / ``Rule.op_slots``) and any further condition (``Rule.supports``).
An op may have several candidate families (``mul``: ``linear`` when one operand is decomposed,
``product`` when two are); they are tried by descending ``priority``, then in registration
order, and the first whose chosen variant supports the node wins. Adding a rule for a new op
means registering its canonical name in the module that implements the family and adding an
example call to ``tests/rule_examples.py``; the registry-driven tests
(``tests/test_registry_rules.py``) then check exactness, the tangent map and separation.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from ..errors import LMDError
from .base import OpCall, Rule

FAMILIES: dict[str, dict[str, type[Rule]]] = {}
OPS: dict[str, list[str]] = {}  # op -> candidate families, highest priority first
_PRIORITY: dict[str, int] = {}

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
# ``Rules`` options that are not a family's variant.
OPTIONS: dict[str, tuple[str, ...]] = {
    "bias_split": ("none", "sum", "ratio"),
    "fallback": ("error", "taylor"),
}


def register(family: str, variant: str = "default", ops: Iterable[str] = (), priority: int = 0):
    """Class decorator: register a rule as ``variant`` of ``family`` and make ``family`` a
    candidate for each op in ``ops``. Registering a variant or an op twice is an error."""

    def decorate(cls: type[Rule]) -> type[Rule]:
        variants = FAMILIES.setdefault(family, {})
        if variant in variants:
            raise LMDError(f"Rule {cls.__name__}: family {family!r} already has a variant {variant!r} "
                           f"({variants[variant].__name__}).")
        variants[variant] = cls
        cls.registered = True  # read by Rule.verified on this exact class only
        _PRIORITY.setdefault(family, priority)
        for op in ops:
            candidates = OPS.setdefault(op, [])
            if family in candidates:
                raise LMDError(f"Op {op!r} is registered twice for family {family!r}.")
            candidates.append(family)
            candidates.sort(key=lambda f: -_PRIORITY[f])  # stable: ties keep registration order
        return cls

    return decorate


def choices(option: str) -> tuple[str, ...]:
    """The values a ``Rules`` option accepts, from the registry."""
    if option in OPTIONS:
        return OPTIONS[option]
    return tuple(FAMILIES[option])


@dataclass(frozen=True)
class Rules:
    """Which rule each layer family uses. Defaults are the paper's, except ``product="gate"``.

    Each field names a family's variant: ``activation`` secant | tangent | rescale, ``bias_split``
    none | sum | ratio, ``batchnorm`` identity | uniform, ``norm`` ratio | identity | uniform,
    ``product`` gate | shapley | freeze, ``softmax`` freeze | secant, ``fallback`` error | taylor
    (``docs/rules.md``). ``overrides`` maps a module qualified name, a module type, or a
    canonical op name (e.g. ``"relu"``) to a variant name (``"tangent"``, ``"taylor"``, ...) or
    to a ``Rule`` subclass.
    Lookups go module name, then module type, then op. A key that matches nothing in the
    model, or a variant that cannot decompose the node it matches, is an ``LMDError``.
    """

    activation: str = "secant"
    bias_split: str = "none"
    batchnorm: str = "identity"
    norm: str = "ratio"
    product: str = "gate"
    softmax: str = "freeze"
    fallback: str = "error"
    eps: float = 1e-6
    overrides: Mapping[Any, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in (*OPTIONS, *sorted(set(CHOICES.values()))):
            value = getattr(self, name)
            allowed = choices(name)
            if value not in allowed:
                raise LMDError(f"Rules({name}={value!r}) is not a known choice; use one of {', '.join(allowed)}.")
        if not self.eps > 0:
            raise LMDError(f"Rules(eps={self.eps!r}) must be a positive number.")


# Override keys that matched a call since the last ``matched_overrides().clear()``: sub-ops of
# composite rules (a transformer layer's activation) are not graph nodes, only calls.
_MATCHED: set[Any] = set()


def matched_overrides() -> set[Any]:
    return _MATCHED


def _override_for(call: OpCall, overrides: Mapping[Any, Any]) -> Any:
    # Module names and types match only the node that is that module's call, not every op
    # traced inside its forward.
    module_type = type(call.module) if call.module is not None else call.extra.get("module_type")
    keys = [call.layer, module_type] if module_type is not None else []
    for key in (*keys, call.op):
        if key in overrides:
            _MATCHED.add(key)
            return overrides[key]
    return None


def _where(call: OpCall) -> str:
    return f"node {call.node!r} (op {call.op!r}, module {call.layer or '<top level>'!r}, {call.source or 'no source'})"


def _ops_of(cls: type[Rule]) -> set[str] | None:
    """The ops of the family a registered rule class (or its registered base) belongs to;
    None for a user's own rule class outside the registry."""
    for family, variants in FAMILIES.items():
        if family != "taylor" and any(issubclass(cls, v) for v in variants.values()):
            return {op for op, families in OPS.items() if family in families}
    return None


def _taylor(call: OpCall, rules: Rules) -> Rule | None:
    cls = FAMILIES["taylor"]["default"]
    return cls(call, rules) if cls.supports(call) else None


def resolve(call: OpCall, rules: Rules) -> Rule | None:
    """The rule for a mixed node under ``rules``, or None if no rule decomposes it."""
    override = _override_for(call, rules.overrides)
    if isinstance(override, type) and issubclass(override, Rule):
        ops = _ops_of(override)
        if ops is not None and call.op not in ops:
            raise LMDError(f"Rule override {override.__name__} cannot decompose {_where(call)}: it is registered for "
                           f"{', '.join(sorted(ops)) or 'no op'}, not {call.op!r}.")
        if not override.supports(call):
            raise LMDError(f"Rule override {override.__name__} cannot decompose {_where(call)}: "
                           f"{override.why_not(call)}.")
        return override(call, rules)
    if override == "taylor":
        rule = _taylor(call, rules)
        if rule is None:
            raise LMDError(f"Rule override 'taylor' cannot decompose {_where(call)}: it has no floating-point "
                           "decomposed operand.")
        return rule
    families = OPS.get(call.op, [])
    if override is not None:
        if not any(override in FAMILIES[f] for f in families):
            known = [f"{f}: {', '.join(sorted(FAMILIES[f]))}" for f in families]
            raise LMDError(f"Rule override {override!r} for {_where(call)} is unknown; its rule families and "
                           f"variants are {'; '.join(known) or 'none'}, or 'taylor'.")
    reasons = []
    for family in families:
        variants = FAMILIES[family]
        variant = override if override in variants else (getattr(rules, CHOICES[family]) if family in CHOICES
                                                          else "default")
        cls = variants.get(variant) or variants.get("default")
        if cls is None:
            continue
        if cls.supports(call):
            return cls(call, rules)
        reasons.append(f"{family}/{variant}: {cls.why_not(call)}")
    if override is not None:
        raise LMDError(f"Rule override {override!r} cannot decompose {_where(call)}: {'; '.join(reasons)}.")
    if rules.fallback == "taylor":
        return _taylor(call, rules)
    return None


def why_unsupported(call: OpCall) -> str:
    """One line on why no registered rule takes ``call`` (for ``UnsupportedOpError``)."""
    families = OPS.get(call.op, [])
    if not families:
        return "no rule is registered for this op"
    return "; ".join(f"{family}: {next(iter(FAMILIES[family].values())).why_not(call)}" for family in families)


def check_override_keys(overrides: Mapping[Any, Any], names: set[str], types: set[type], ops: set[str]) -> None:
    """Raise ``LMDError`` for override keys that match no module name, module type or op of the model."""
    unknown = []
    for key in overrides:
        if isinstance(key, type):
            if key not in types:
                present = sorted(t.__name__ for t in types)
                unknown.append(f"module type {key.__name__} (types in the model: "
                               f"{', '.join(difflib.get_close_matches(key.__name__, present, 5, 0.3)) or 'none close'})")
        elif isinstance(key, str):
            if key not in names and key not in ops:
                close = difflib.get_close_matches(key, sorted(names | ops), 5, 0.5)
                unknown.append(f"{key!r} (closest names: {', '.join(close) or 'none'})")
        else:
            unknown.append(f"{key!r} (keys are module names, module types or op names)")
    if unknown:
        raise LMDError("Rules(overrides=...) keys match nothing in the model: " + "; ".join(unknown)
                       + ". Use a module qualified name from model.named_modules(), a module type, or a "
                         "canonical op name shown in dec.report().")
