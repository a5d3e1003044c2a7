"""What rewritten graphs call at run time. Never imports ``gsr_compiler.passes``."""
from .reversible import ReversibleChain

__all__ = ["ReversibleChain"]
