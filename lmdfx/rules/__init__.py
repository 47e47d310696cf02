"""Decomposition rules, registered by canonical op (see ``registry``)."""

from . import activations, attention, linear, norms, products, selection, taylor  # noqa: F401  (registration)
from . import rescale  # noqa: F401  (registration: activation="rescale")
from .base import OpCall, Rule
from .registry import FAMILIES, OPS, Rules, resolve

__all__ = ["FAMILIES", "OPS", "OpCall", "Rule", "Rules", "resolve"]
