"""Errors raised by gsr-compiler."""


class GSRCompileError(RuntimeError):
    """A model cannot be compiled as asked.

    The message says what was wrong and what to do about it. It is raised before
    the user's model or tensors are modified.
    """


class LayerFailedError(GSRCompileError):
    """A layer of the model raised while the compiler ran it on the call's inputs.

    The message names the layer, its error and, where recognizable, the likely cause;
    the layer's own exception is the ``__cause__``.
    """


class GSRPrecisionWarning(UserWarning):
    """A reversible chain's backward measured more drift than it guarantees to be harmless:
    the reconstruction error of a block input above ``GSRConfig.drift_tolerance``, or a
    discrete choice that the rebuilt input may have flipped. The message says what to change
    (``replay_margin``, ``anchors``, float32 over lower precision)."""
