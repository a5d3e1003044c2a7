"""Triton availability, lazy kernel compilation and the Triton-or-torch choice.

Triton is optional: this module imports without it, and every kernel has a torch reference that
runs everywhere. ``backend`` arguments mean:

* ``"auto"``: Triton when it is importable and the tensors are on CUDA, else the torch reference;
* ``"torch"``: always the torch reference;
* ``"triton"``: always Triton (on CPU tensors this needs ``TRITON_INTERPRET=1``, which is how the
  tests run the kernels without a GPU).

:func:`use_triton` decides per launch; :func:`choose_backend` makes the same decision up front for
the devices a compiled model sees, so ``gsr_compile`` can refuse an impossible ``"triton"`` before
it changes anything and ``explain()`` can say what runs.

Kernels are written as plain functions and handed to ``triton.jit`` on first launch (see
:class:`LazyKernel`): ``triton.jit`` decides between the compiler and the interpreter when it is
called, so importing this package does not fix the choice. Triton's own library (``tl.sum``,
``tl.rand``) is fixed when triton is imported, though, so ``TRITON_INTERPRET=1`` has to be set
before the first ``import triton`` (which ``import torch_geometric`` does).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable

import torch

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "triton", "tl", "LazyKernel", "interpreting", "use_triton",
           "check_backend", "triton_library_mode", "BACKENDS", "BackendChoice", "choose_backend",
           "cdiv", "next_power_of_2"]

BACKENDS = ("auto", "torch", "triton")


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_library_mode() -> str:
    """``"interpreted"`` or ``"compiled"``: how triton's own ``@jit`` helpers (``tl.sum``,
    ``tl.rand``, ``tl.cumsum``) were built, which ``TRITON_INTERPRET`` decided when triton was
    first imported. Kernels that call them can only run in that same mode."""
    if not HAS_TRITON:
        return "unavailable"
    return "interpreted" if type(tl.sum).__name__ == "InterpretedFunction" else "compiled"


def check_backend(backend: str) -> None:
    """Raises ``ValueError`` unless ``backend`` is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Whether to launch the Triton kernel for these tensors under ``backend``."""
    check_backend(backend)
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if backend == "auto":
        return HAS_TRITON and on_cuda
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' but triton is not importable; install "
                           "gsr-compiler[triton] or use backend='torch'")
    if not on_cuda and not interpreting():
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (the Triton "
                           "interpreter); use backend='auto' or 'torch' on CPU")
    return True


@dataclass(frozen=True)
class BackendChoice:
    """What ``backend`` runs for tensors on given devices, and why (for ``explain()``)."""

    requested: str
    kernels: bool  # Triton kernels (True) or the torch reference (False)
    reason: str

    @property
    def name(self) -> str:
        return "triton" if self.kernels else "torch"


def choose_backend(backend: str, devices: Iterable[torch.device]) -> BackendChoice:
    """The choice :func:`use_triton` makes for tensors on ``devices``, decided up front.

    Raises ``ValueError`` (saying what to do) for an unknown ``backend`` and for
    ``backend="triton"`` where the kernels cannot run: triton not importable, CPU tensors
    without ``TRITON_INTERPRET=1``, or ``TRITON_INTERPRET`` changed after triton was imported.
    """
    check_backend(backend)
    kinds = sorted({torch.device(d).type for d in devices})
    on_cuda = bool(kinds) and all(k == "cuda" for k in kinds)
    where = f"inputs on {', '.join(kinds) or 'no device'}"
    if backend == "torch":
        return BackendChoice(backend, False, "backend='torch' forces the torch reference")
    if backend == "auto":
        if not on_cuda:
            return BackendChoice(backend, False, f"{where}; Triton kernels run on CUDA tensors")
        if not HAS_TRITON:
            return BackendChoice(backend, False, f"{where}, but triton is not importable")
        return BackendChoice(backend, True, f"{where}, triton {triton.__version__}")
    if not HAS_TRITON:
        raise ValueError("backend='triton' but triton is not importable; install triton "
                         "(pip install gsr-compiler[triton]) or use backend='auto' or 'torch'")
    if not on_cuda and not interpreting():
        raise ValueError(
            f"backend='triton' with {where}: Triton kernels run on CUDA tensors, and on CPU "
            "tensors only in Triton's interpreter (set TRITON_INTERPRET=1 before anything imports "
            "triton). Move the model and inputs to CUDA, or use backend='auto' (the torch path on "
            "CPU) or 'torch'")
    mode = "interpreted" if interpreting() else "compiled"
    if triton_library_mode() != mode:
        raise ValueError(
            f"backend='triton': TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r} asks "
            f"for {mode} kernels, but triton was imported with its library "
            f"{triton_library_mode()} (TRITON_INTERPRET is read when triton is first imported, "
            "and torch_geometric imports it). Set TRITON_INTERPRET in the environment of the "
            "process, or use backend='auto' or 'torch'")
    return BackendChoice(backend, True, f"{where}, triton {triton.__version__} {mode}"
                         + (" (TRITON_INTERPRET=1)" if mode == "interpreted" else ""))


class LazyKernel:
    """A kernel function that is passed to ``triton.jit`` at its first launch.

    ``LazyKernel(fn)[grid](*args, **meta)`` works like a ``@triton.jit`` function. Deciding at
    first launch rather than at import means importing this package never fixes the mode; but
    triton's own helpers are fixed when triton is imported, so the mode must match that (checked,
    with an explanation, instead of failing deep inside triton).
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._jitted: Dict[bool, Any] = {}

    def jitted(self) -> Any:
        if not HAS_TRITON:
            raise RuntimeError(f"kernel {self.fn.__name__} needs triton, which is not importable")
        key = interpreting()
        if key != (triton_library_mode() == "interpreted"):
            raise RuntimeError(
                f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r} now, but triton was "
                f"imported with its library {triton_library_mode()} (TRITON_INTERPRET is read at "
                "import; torch_geometric imports triton). Set TRITON_INTERPRET before anything "
                "imports triton, e.g. in the environment of the process.")
        kernel = self._jitted.get(key)
        if kernel is None:
            kernel = self._jitted[key] = triton.jit(self.fn)
        return kernel

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        return self.jitted()[grid]

    def __repr__(self) -> str:
        return f"LazyKernel({self.fn.__name__})"


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))
