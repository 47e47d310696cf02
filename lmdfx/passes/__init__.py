"""The compiler pipeline, one pass per module: trace -> normalize -> provenance ->
assign_rules -> rewrite -> optimize."""

from .assign_rules import assign_rules
from .normalize import normalize
from .optimize import optimize
from .provenance import provenance
from .rewrite import Layout, resolve_record, rewrite
from .trace import trace

__all__ = ["trace", "normalize", "provenance", "assign_rules", "rewrite", "resolve_record", "optimize", "Layout"]
