"""Errors raised by gsr-compiler."""


class GSRCompileError(RuntimeError):
    """A model cannot be compiled as asked.

    The message says what was wrong and what to do about it. It is raised before
    the user's model or tensors are modified.
    """
