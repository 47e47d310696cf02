"""The exceptions lmdfx raises. Every message says what was wrong and what to do."""

from __future__ import annotations


class LMDError(Exception):
    """Base class of every lmdfx error; also raised for bad arguments."""


class TraceError(LMDError):
    """The model could not be captured as a graph."""


class UnsupportedOpError(LMDError):
    """One or more mixed nodes have no decomposition rule."""

    def __init__(self, message: str, nodes: list[dict] | None = None):
        super().__init__(message)
        self.nodes = nodes or []


class ExactnessError(LMDError):
    """The components do not sum to a node's value within the dtype's tolerance, or a value
    or component is not finite. ``row`` is the node's ``report()`` row."""

    def __init__(self, message: str, row: object = None):
        super().__init__(message)
        self.row = row
