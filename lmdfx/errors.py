"""The exceptions lmdfx raises. Every message says what was wrong and what to do."""

from __future__ import annotations


class LMDError(Exception):
    """Base class of every lmdfx error; also raised for bad arguments."""


class TraceError(LMDError):
    """The model could not be symbolically traced by torch.fx."""


class UnsupportedOpError(LMDError):
    """One or more mixed nodes have no decomposition rule."""

    def __init__(self, message: str, nodes: list[dict] | None = None):
        super().__init__(message)
        self.nodes = nodes or []
