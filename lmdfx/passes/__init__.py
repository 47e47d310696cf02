"""The compiler pipeline, one pass per module: trace -> normalize -> provenance ->
constant_outputs -> assign_rules -> rewrite -> optimize (structural_zeros, dead-code elimination)."""

from .assign_rules import assign_rules
from .constants import constant_outputs
from .normalize import normalize
from .optimize import TrunkDispatch, optimize
from .provenance import provenance
from .rewrite import Layout, resolve_record, rewrite
from .structural_zeros import structural_zeros
from .trace import trace

__all__ = ["trace", "normalize", "provenance", "constant_outputs", "assign_rules", "rewrite", "resolve_record", "optimize",
           "structural_zeros", "TrunkDispatch", "Layout"]
