"""gsr-compiler: compile deep residual GNNs into Grouped-Sparse-Reversible form."""
from .api import GSRModule, gsr_compile
from .config import GSRConfig
from .errors import GSRCompileError, GSRPrecisionWarning
from .memory import MemoryComparison, compare_memory

__all__ = ["gsr_compile", "GSRConfig", "GSRModule", "GSRCompileError", "GSRPrecisionWarning",
           "compare_memory", "MemoryComparison"]
__version__ = "0.1.0"
