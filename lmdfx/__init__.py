"""lmdfx — Layer-wise Modality Decomposition for fusion models, as a torch.fx compiler."""

from .compiler import compile
from .errors import ExactnessError, LMDError, TraceError, UnsupportedOpError
from .rules import Rules
from .runtime import Decomposer, Decomposition, OperatingPoint
from . import metrics

__all__ = ["compile", "Rules", "Decomposer", "Decomposition", "OperatingPoint", "LMDError", "TraceError",
           "UnsupportedOpError", "ExactnessError", "metrics"]
__version__ = "0.1.0"
