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
