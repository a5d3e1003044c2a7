"""The store-everything reference of a compiled model, and gradient checks against it.

A reversible chain keeps only its output and rebuilds everything else in its backward. The
*same* architecture run with ordinary autograd, keeping every activation, rebuilds nothing: its
gradients are what the reversible backward must reproduce. :func:`store_everything` builds that
model from a compiled one (a copy with the same weights, whose chains run
:meth:`~gsr_compiler.runtime.reversible.ReversibleChain.forward_storing_everything` and draw the
same dropout seeds), and :func:`verify_gradients` runs one step through both and compares every
gradient. ``GSRModule.verify_gradients`` is the method form.

Note the reference is the *rewritten* architecture (grouped coupling, narrowed branches, top-k):
the model as written is a different function (``explain()`` says why).

A deep model can be so ill-conditioned that its float32 gradients, computed by plain autograd
storing everything, are themselves 1e-2 or more from the exact ones (ResGEN at 256 blocks: its
learned softmax temperatures up to 38%). Two float32 runs that round
differently then disagree by that much, and no tolerance separates a drifting backward from
rounding. ``against="float64"`` measures both float32 runs against the same reference run in
float64: the compiled model passes where it is as close to exact as storing everything in its
own dtype is (within :data:`ROUNDING_SLACK` times that error), or within the tolerance.
"""
from __future__ import annotations

import copy
import math
import re
import statistics
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, fx, nn

from .runtime.drift import relative_error
from .runtime.recomputed_block import RecomputedBlock
from .runtime.reversible import ReversibleChain

__all__ = ["ROUNDING_SLACK", "store_everything", "verify_gradients", "GradientCheck"]

#: With ``against="float64"``: how many times the store-everything run's own rounding error a
#: compiled gradient may be off the float64 one.
ROUNDING_SLACK = 2.0


def store_everything(graph_module: fx.GraphModule) -> fx.GraphModule:
    """A deep copy of a compiled graph (``gsr_model.graph_module``) whose reversible chains
    and recomputed blocks keep every activation, with the same weights, buffers and parameter
    names."""
    # The chains' coupling arena is scratch the reference never uses: shared, not copied.
    memo = {id(m.coupling_arena): m.coupling_arena for m in graph_module.modules()
            if isinstance(m, ReversibleChain) and getattr(m, "coupling_arena", None) is not None}
    ref = copy.deepcopy(graph_module, memo)
    for module in ref.modules():
        if isinstance(module, (ReversibleChain, RecomputedBlock)):
            # The instance attribute shadows the class's forward for nn.Module.__call__.
            module.forward = module.forward_storing_everything
    return ref


@dataclass
class GradientCheck:
    """One step of a compiled model against its store-everything reference.

    Attributes:
        errors: name -> ``(relative error, max abs error)`` of each gradient against the
            reference: parameters by their name in ``graph_module``, float inputs as
            ``"input:<position>"``. A gradient that is zero up to rounding (its reference within
            64 units of roundoff of the largest gradient entry of the step) has its error
            relative to that entry.
        output_error: relative error of the forward output.
        tolerance: the relative error :attr:`ok` allows.
        chains: what each chain's backward kept and measured (``ChainPrecision.summary``).
        against: ``"reference"`` (the store-everything run in the model's dtype) or
            ``"float64"`` (the store-everything run in float64).
        rounding: with ``against="float64"``, name -> the relative error of the store-everything
            run in the model's own dtype against float64 (``"output"`` for the output): what
            rounding alone costs; where the median of the gradients of the same role in other
            blocks is larger, that median (``_pooled``). :attr:`ok` allows
            :data:`ROUNDING_SLACK` times it.
    """

    errors: dict[str, tuple[float, float]]
    output_error: float
    tolerance: float
    chains: dict[str, str] = field(default_factory=dict)
    against: str = "reference"
    rounding: dict[str, float] = field(default_factory=dict)

    def allowed(self, name: str) -> float:
        """The relative error :attr:`ok` allows the gradient ``name`` (or ``"output"``)."""
        return max(self.tolerance, ROUNDING_SLACK * self.rounding.get(name, 0.0))

    @property
    def worst(self) -> tuple[str, float]:
        """The gradient with the largest relative error, and that error."""
        if not self.errors:
            return "", 0.0
        name = max(self.errors, key=lambda n: self.errors[n][0])
        return name, self.errors[name][0]

    @property
    def failing(self) -> list[str]:
        """The gradients (and ``"output"``) off by more than :meth:`allowed`."""
        bad = ["output"] if self.output_error > self.allowed("output") else []
        return bad + [n for n, (rel, _) in self.errors.items() if not rel <= self.allowed(n)]

    @property
    def ok(self) -> bool:
        return not self.failing

    def __str__(self) -> str:
        name, worst = self.worst
        what = ("the store-everything reference" if self.against == "reference" else
                "the store-everything reference in float64")
        rule = (f"tolerance {self.tolerance:g}" if self.against == "reference" else
                f"tolerance {self.tolerance:g}, or {ROUNDING_SLACK:g}x the rounding error of "
                "storing everything in the model's dtype")
        lines = [f"gradient check against {what}: {'OK' if self.ok else 'FAILED'} ({rule})",
                 f"  output: relative error {self.output_error:.2e}"
                 + (f" (rounding {self.rounding['output']:.2e})" if "output" in self.rounding
                    else ""),
                 f"  {len(self.errors)} gradients, largest relative error {worst:.2e} ({name})"]
        if self.against == "float64":
            lines[-1] += f"; {len(self.failing)} over what is allowed"
        # worst first, against what each may be off (the tolerance, without float64)
        ranked = sorted(self.errors.items(), key=lambda kv: -kv[1][0] / self.allowed(kv[0]))
        for n, (rel, abs_) in ranked[:10]:
            floor = f", rounding {self.rounding.get(n, 0.0):.2e}" if self.rounding else ""
            lines.append(f"    {rel:.2e} rel, {abs_:.2e} abs{floor}  {n}")
        for chain, summary in self.chains.items():
            lines.append(f"  {chain}: {summary}")
        return "\n".join(lines)


def _default_loss(output) -> Tensor:
    """A loss whose gradient reaches every output element with a different weight."""
    tensors = [t for t in (output if isinstance(output, (tuple, list)) else (output,))
               if isinstance(t, Tensor) and t.is_floating_point()]
    if not tensors:
        raise ValueError("verify_gradients: the model output has no floating-point tensor; "
                         "pass loss_fn=")
    g = torch.Generator().manual_seed(0)
    total = 0
    for t in tensors:
        weight = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype)
        total = total + (t * weight).sum()
    return total


def _step(module: nn.Module, values: Sequence[object], loss_fn: Callable
          ) -> tuple[object, dict[str, Tensor]]:
    leaves = [v.detach().requires_grad_() if isinstance(v, Tensor) and v.is_floating_point()
              else v for v in values]
    output = module(*leaves)
    loss = loss_fn(output)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError("verify_gradients: loss_fn must return a scalar tensor, got "
                         f"{type(loss).__name__}{'' if not isinstance(loss, Tensor) else tuple(loss.shape)}")
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    inputs = [(f"input:{i}", v) for i, v in enumerate(leaves)
              if isinstance(v, Tensor) and v.requires_grad]
    wrt = named + inputs
    grads = torch.autograd.grad(loss, [t for _, t in wrt], allow_unused=True)
    return output, {n: g for (n, _), g in zip(wrt, grads) if g is not None}


def _first_tensor(output) -> Optional[Tensor]:
    for t in (output if isinstance(output, (tuple, list)) else (output,)):
        if isinstance(t, Tensor):
            return t
    return None


def _as_float64(value):
    """A positional input in float64: floating tensors converted, a PyG ``Data`` copied with its
    floating tensors converted, anything else as it is."""
    if isinstance(value, Tensor):
        return value.double() if value.is_floating_point() else value
    if hasattr(value, "apply") and hasattr(value, "clone"):  # torch_geometric Data / Batch
        return value.clone().apply(lambda t: t.double() if t.is_floating_point() else t)
    return value


def _compare(grads: dict[str, Tensor], ref_grads: dict[str, Tensor], dtype: torch.dtype
             ) -> dict[str, tuple[float, float]]:
    """``name -> (relative error, max abs error)`` of ``grads`` against ``ref_grads``."""
    # A gradient that is zero in exact arithmetic (a bias in front of a BatchNorm) is rounding
    # noise in both runs: its relative error means nothing. One whose reference is within 64
    # units of roundoff (of ``dtype``) of the step's largest gradient entry is judged against
    # that entry.
    scale = max((float(g.detach().abs().max()) for g in ref_grads.values()
                 if g.layout == torch.strided and g.numel() and g.is_floating_point()),
                default=0.0)
    errors = {}
    for name, ref in ref_grads.items():
        mine = grads.get(name)
        if mine is None:
            errors[name] = (math.inf, math.inf)
            continue
        # the gradient of a sparse input (a torch.sparse adj_t) is compared entry by entry
        mine, ref = (t.to_dense() if t.layout != torch.strided else t for t in (mine, ref))
        abs_err = float((mine.detach().double() - ref.detach().double()).abs().max()) \
            if ref.numel() else 0.0
        relative = relative_error(mine, ref)
        if ref.numel() and ref.is_floating_point() and scale > 0 and \
                float(ref.detach().abs().max()) <= 64 * torch.finfo(dtype).eps * scale:
            relative = abs_err / scale
        errors[name] = (relative, abs_err)
    for name in grads.keys() - ref_grads.keys():
        errors[name] = (math.inf, math.inf)
    return errors


def _role(name: str) -> str:
    """A gradient's name up to block numbers: ``gcns.131.t`` -> ``gcns.*.t``."""
    return re.sub(r"\d+", "*", name)


def _pooled(rounding: dict[str, float]) -> dict[str, float]:
    """Each gradient's rounding error, or the median of the gradients of its role (names equal
    up to block numbers) where that is larger. The rounding error of one scalar (a learned
    temperature, an ``eps``) is a single random draw: a second float32 run that rounds
    otherwise can be several times off where the first was lucky. Its role's other blocks tell
    how large such draws run."""
    roles: dict[str, list[float]] = {}
    for name, error in rounding.items():
        roles.setdefault(_role(name), []).append(error)
    typical = {role: statistics.median(errors) for role, errors in roles.items()}
    return {name: max(error, typical[_role(name)]) for name, error in rounding.items()}


def _output_error(out, ref_out) -> float:
    a, b = _first_tensor(out), _first_tensor(ref_out)
    return relative_error(a, b) if a is not None and b is not None else 0.0


def verify_gradients(graph_module: fx.GraphModule, values: Sequence[object],
                     loss_fn: Optional[Callable] = None, tolerance: float = 1e-3,
                     against: str = "reference") -> GradientCheck:
    """Runs one step (forward, ``loss_fn(output)``, backward) of ``graph_module`` and of its
    :func:`store_everything` copy, with the same random numbers, and compares the gradients.

    Nothing of the caller's changes: ``.grad`` of the parameters is not touched, BatchNorm
    statistics and the random generators are as they were before the call.

    Args:
        graph_module: a compiled graph (``gsr_model.graph_module``).
        values: its positional inputs.
        loss_fn: output -> scalar tensor; default a fixed random weighting of the output.
        tolerance: relative error :attr:`GradientCheck.ok` allows.
        against: ``"reference"``: the store-everything copy in the model's dtype.
            ``"float64"``: the store-everything copy run in float64 (inputs converted); the
            copy in the model's dtype is run as well, and a gradient passes when it is within
            ``tolerance`` or :data:`ROUNDING_SLACK` times that copy's own error (module
            docstring).
    """
    if against not in ("reference", "float64"):
        raise ValueError(f"against={against!r}: must be 'reference' (the store-everything run "
                         "in the model's dtype) or 'float64' (the same in float64, with the "
                         "model dtype's rounding as the floor)")
    loss_fn = loss_fn or _default_loss
    reference = store_everything(graph_module)
    truth = store_everything(graph_module).double() if against == "float64" else None
    devices = sorted({v.device.index or 0 for v in values
                      if isinstance(v, Tensor) and v.device.type == "cuda"})
    dtype = next((v.dtype for v in values if isinstance(v, Tensor) and v.is_floating_point()),
                 next((p.dtype for p in graph_module.parameters() if p.is_floating_point()),
                      torch.float32))
    buffers = {n: b.detach().clone() for n, b in graph_module.named_buffers()}
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        state = torch.get_rng_state()
        cuda_states = [torch.cuda.get_rng_state(d) for d in devices]

        def same_random_numbers():
            torch.set_rng_state(state)
            for d, s in zip(devices, cuda_states):
                torch.cuda.set_rng_state(s, d)

        out, grads = _step(graph_module, values, loss_fn)
        same_random_numbers()
        ref_out, ref_grads = _step(reference, values, loss_fn)
        if truth is not None:
            same_random_numbers()
            true_out, true_grads = _step(truth, [_as_float64(v) for v in values], loss_fn)
    with torch.no_grad():
        for n, b in graph_module.named_buffers():
            b.copy_(buffers[n])
    chains = {getattr(m, "gsr_name", n): m.last_precision.summary()
              for n, m in graph_module.named_modules()
              if isinstance(m, ReversibleChain) and m.last_precision is not None}
    if truth is None:
        return GradientCheck(_compare(grads, ref_grads, dtype), _output_error(out, ref_out),
                             float(tolerance), chains)
    rounding = _pooled({n: e for n, (e, _) in _compare(ref_grads, true_grads, dtype).items()})
    rounding["output"] = _output_error(ref_out, true_out)
    return GradientCheck(_compare(grads, true_grads, dtype), _output_error(out, true_out),
                         float(tolerance), chains, against="float64", rounding=rounding)
