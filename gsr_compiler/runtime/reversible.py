r"""Reversible chains of grouped additive coupling blocks.

A chain of L blocks, each splitting the D channels of its input into G groups
:math:`x_1, \dots, x_G` and computing

.. math::
    y_0 = \sum_{i=2}^{G} x_i, \qquad y_i = x_i + f_i(y_{i-1}), \quad i = 1, \dots, G,

with each :math:`f_i` a copy of the residual branch at width D/G. The chain keeps only
its output for backward. Backward walks the blocks from last to first; for each group
(last to first) it runs :math:`f_i(y_{i-1})` once with grad, and that one result both
rebuilds the input, :math:`x_i = y_i - f_i(y_{i-1})`, and is differentiated. This costs
one extra forward per block, where PyG's ``GroupAddRev`` spends two (an inverse without
grad, then a recompute with grad).

Nothing here frees or resizes a tensor the caller can see.

With a :class:`~gsr_compiler.runtime.arena.CouplingArena` attached (``coupling_arena``, set by
the compiler under ``GSRConfig.plan_memory``), each call keeps the groups in the arena's scratch
and updates them in place; otherwise every update is a fresh tensor. Both paths run the same
operations on operands of the same layout, so they agree bit for bit; the output and the input
gradient are fresh tensors either way.

``kernel_backend`` (set by the compiler from ``GSRConfig.backend``) picks who runs the coupling
update and inverse: the Triton kernel ``coupling_add_``/``coupling_sub_`` (into the scratch, or
into a fresh tensor without an arena) or torch's ``add``/``sub``. Each output element is one
IEEE addition or subtraction of the same two operands either way, so the backends agree bit for
bit as well.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from .first_order import first_order_only
from ..errors import GSRPrecisionWarning
from .arena.coupling_arena import CouplingScratch
from .autocast_state import autocast_enabled, capture_autocast, restored_autocast
from .choices import ChoiceTape
from .drift import (ANCHOR_SHARE, AnchorPolicy, AnchorSetting, ChainPrecision, ForwardGuard, block_margins,
                    calibrated_scale, check_anchors, drift_findings, exact_patch,
                    recording_margins, relative_error, unit_roundoff)
from .gradient_slots import GradientSlots
from .kernels import coupling_add_, coupling_sub_, use_triton
from .replay import draw_seed, frozen_running_stats, seeded


class ReversibleChain(nn.Module):
    """L grouped coupling blocks that store only the chain output for backward.

    Args:
        blocks: ``blocks[i][j]`` is the branch :math:`f_j` of block ``i``, called as
            ``f(h, *side_inputs_of_block_i)``.
        side_index: ``side_index[i]`` lists, for block ``i``, the positions of its side
            inputs (``edge_index``, ``edge_attr``, ``batch``, ...) among the chain's.
        replay_margin: relative margin under which the forward records a discrete choice
            (ReLU sign, top-k selection) for the backward recompute to repeat
            (:mod:`~gsr_compiler.runtime.choices`); None: nothing is recorded or checked.
        anchors: where the forward keeps exact block inputs for the backward to resume from
            (:class:`~gsr_compiler.runtime.drift.AnchorPolicy`): ``"auto"``, an int, or None.
        drift_tolerance: a backward that measures a larger relative reconstruction error, or
            any unsafe choice, warns (:class:`~gsr_compiler.errors.GSRPrecisionWarning`) once.
        verify: every backward also runs the chain storing everything
            (:meth:`forward_storing_everything`, from a kept copy of the input) and records each
            parameter's relative gradient error in ``last_precision.gradient_errors``; warns
            above ``drift_tolerance``. Costs the memory and time of the plain model: a check,
            not a way to train.

    Attributes:
        last_precision: what the last backward kept and measured
            (:class:`~gsr_compiler.runtime.drift.ChainPrecision`), None before one ran or
            with ``replay_margin`` and ``anchors`` both None.
        kernel_backend: ``"auto"``, ``"torch"`` or ``"triton"``: who runs the coupling update
            and inverse (see :func:`~gsr_compiler.runtime.kernels.use_triton`).
    """

    #: How a residual block maps onto the coupling; ``TwoStreamChain`` is the other form.
    coupling = "grouped"

    def __init__(
        self,
        blocks: Sequence[Sequence[nn.Module]],
        side_index: Sequence[Sequence[int]],
        replay_margin: Optional[float] = None,
        anchors: AnchorSetting = None,
        drift_tolerance: float = 1e-3,
        verify: bool = False,
    ) -> None:
        super().__init__()
        if len(blocks) == 0:
            raise ValueError("a reversible chain needs at least one block")
        groups = {len(b) for b in blocks}
        if len(groups) != 1 or min(groups) < 2:
            raise ValueError(f"every block needs the same number (>= 2) of groups, got {sorted(groups)}")
        if len(side_index) != len(blocks):
            raise ValueError("side_index needs one entry per block")
        self.blocks = nn.ModuleList(nn.ModuleList(b) for b in blocks)
        self.side_index = [tuple(int(i) for i in s) for s in side_index]
        self.groups = groups.pop()
        if replay_margin is not None:
            ChoiceTape(replay_margin)  # checks it
        self.replay_margin = None if replay_margin is None else float(replay_margin)
        self.anchors = check_anchors(anchors)
        if not (isinstance(drift_tolerance, (int, float)) and drift_tolerance > 0):
            raise ValueError(f"drift_tolerance must be a positive number, got {drift_tolerance!r}")
        self.drift_tolerance = float(drift_tolerance)
        if not isinstance(verify, bool):
            raise ValueError(f"verify must be True or False, got {verify!r}")
        self.verify = verify
        self.last_precision: Optional[ChainPrecision] = None
        self._warned: set[str] = set()
        # The arena of the compiled model (GSRConfig.plan_memory), or None: fresh tensors.
        self.coupling_arena = None
        self.kernel_backend = "auto"

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def group_width(self, input_width: int) -> int:
        """The channels of one coupling group for a chain input of ``input_width`` channels."""
        return input_width // self.groups

    def extra_repr(self) -> str:
        guard = getattr(self, "replay_margin", None), getattr(self, "anchors", None)
        text = f"depth={self.depth}, groups={self.groups}"
        if guard != (None, None):
            text += f", replay_margin={guard[0]}, anchors={guard[1]!r}"
        return text

    @property
    def guarded(self) -> bool:
        """Whether calls record choices, keep anchors and measure drift."""
        # Absent in modules pickled before the guard existed: they ran without it.
        return (getattr(self, "replay_margin", None) is not None
                or getattr(self, "anchors", None) is not None or getattr(self, "verify", False))

    def forward(self, x: Tensor, *side_inputs: object) -> Tensor:
        if x.shape[-1] % self.groups:
            raise ValueError(
                f"chain input has {x.shape[-1]} channels, not divisible by groups={self.groups}"
            )
        x = _state_input(x)
        params = [p for p in self._all_parameters() if p.requires_grad]
        side_tensors = [s for s in side_inputs if isinstance(s, Tensor)]
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in params)
            or any(t.requires_grad for t in side_tensors)
        )
        if not needs_grad:
            seeds = self._draw_seeds()
            with self._scratch("forward", x) as scratch:
                return self._run_forward(x, side_inputs, seeds, scratch)
        return _ReversibleChainFunction.apply(self, len(side_inputs), x, *side_inputs, *params)

    def forward_storing_everything(self, x: Tensor, *side_inputs: object,
                                   seeds: Optional[list] = None) -> Tensor:
        """The same function as :meth:`forward`, run with ordinary autograd: every activation
        is kept and nothing is rebuilt, so its gradients are the reference the reversible
        backward must reproduce. ``seeds``: the per-branch seeds a forward drew (None: draw
        them as :meth:`forward` does, from the global generator)."""
        if seeds is None:
            seeds = self._draw_seeds()
        x = _state_input(x)
        G, devices = self.groups, [x.device]
        for i, block in enumerate(self.blocks):
            extra = self._block_inputs(i, side_inputs)
            xs = list(x.chunk(G, dim=-1))
            prev = xs[1]
            for t in xs[2:]:
                prev = prev + t
            ys = []
            for j, f in enumerate(block):
                with seeded(seeds[i][j], devices):
                    prev = xs[j] + f(prev, *extra)
                ys.append(prev)
            x = torch.cat(ys, dim=-1)
        return x

    @torch.no_grad()
    def inverse(self, y: Tensor, *side_inputs: object, seeds=None) -> Tensor:
        """The chain input that produced ``y`` (``seeds`` as drawn by the forward, or
        None in eval mode). Used to measure reconstruction error over depth."""
        if seeds is None:
            if self.training:
                raise ValueError("inverse() in training mode needs the seeds the forward drew")
            seeds = [[None] * self.groups for _ in self.blocks]
        G, devices = self.groups, [y.device]
        kernels = self._use_kernels(y)
        for i in range(self.depth - 1, -1, -1):
            extra = self._block_inputs(i, side_inputs)
            ys = y.chunk(G, dim=-1)
            xs: list[Tensor | None] = [None] * G
            for j in range(G - 1, -1, -1):
                inp = ys[j - 1] if j > 0 else _sum(xs[1:], kernels=kernels)
                with seeded(seeds[i][j], devices):
                    xs[j] = _sub(ys[j], self.blocks[i][j](inp, *extra), kernels=kernels)
            y = torch.cat(xs, dim=-1)
        return y

    # -- pieces shared by the autograd function ------------------------------------

    def _draw_seeds(self) -> list[list[int | None]]:
        # In training mode every branch call gets its own seed, so the backward
        # recompute draws exactly the forward's dropout masks.
        random = self.training
        return [[draw_seed() if random else None for _ in block] for block in self.blocks]

    def _all_parameters(self) -> list[nn.Parameter]:
        # The structure is fixed once built; walking thousands of modules per call is not.
        cached = self.__dict__.get("_parameter_cache")
        if cached is None:
            cached = list(self.parameters())
            self.__dict__["_parameter_cache"] = cached
        return cached

    def _block_inputs(self, i: int, side_inputs: Sequence[object]) -> list[object]:
        return [side_inputs[k] for k in self.side_index[i]]

    def _use_kernels(self, like: Tensor) -> bool:
        """Whether this call's coupling runs as Triton kernels (decided once per call)."""
        # Absent in modules pickled before the option existed: they ran the torch path.
        return use_triton(getattr(self, "kernel_backend", "torch"), like)

    @contextlib.contextmanager
    def _scratch(self, phase: str, like: Tensor) -> Iterator[Optional[CouplingScratch]]:
        """The arena's scratch for one call shaped after ``like`` (the chain input or
        output), or None without an arena."""
        arena = getattr(self, "coupling_arena", None)  # absent in modules pickled before it
        if arena is None:
            yield None
            return
        width = like.shape[-1] // self.groups
        rows = like.numel() // like.shape[-1] if like.shape[-1] else 0
        with arena.scratch(getattr(self, "gsr_name", ""), phase, rows, width, like.dtype,
                           like.device) as scratch:
            yield scratch

    def _warn_about(self, precision: ChainPrecision) -> None:
        """Warns, once per chain and kind, when the backward measured too much drift."""
        warned = self.__dict__.setdefault("_warned", set())
        for kind, message in drift_findings(getattr(self, "gsr_name", "reversible chain"),
                                            precision, self.replay_margin, self.drift_tolerance):
            if kind not in warned:
                warned.add(kind)
                warnings.warn(message, GSRPrecisionWarning, stacklevel=2)

    def _new_tape(self) -> Optional[ChoiceTape]:
        margin = getattr(self, "replay_margin", None)  # absent in modules pickled before it
        if margin is None:
            return None
        return ChoiceTape(max(margin, 2 * getattr(self, "drift_tolerance", 1e-3)))

    def _run_forward(self, x: Tensor, side_inputs: Sequence[object], seeds,
                     scratch: Optional[CouplingScratch] = None,
                     tape: Optional[ChoiceTape] = None,
                     guard: Optional[ForwardGuard] = None) -> Tensor:
        """The chain output. With ``guard``, the exact inputs of the blocks its anchor policy
        picks are cloned into it, and the rebuild error of every block input is predicted; with
        ``tape`` too, each block's choices are recorded and pruned to that prediction."""
        devices = [x.device]
        kernels = self._use_kernels(x)
        # Blocks pass their G groups along as a list: no concatenation between blocks. With
        # scratch, group j lives in scratch.state[j] from block 0 on and is updated in place.
        xs = list(x.chunk(self.groups, dim=-1))
        state = _groups_shaped(scratch.state, xs[0]) if scratch is not None else None
        y0 = _group_shaped(scratch.y0, xs[0]) if scratch is not None else None
        margin, tolerance = getattr(self, "replay_margin", None), getattr(self, "drift_tolerance",
                                                                           1e-3)
        unit = unit_roundoff(x.dtype)
        recording = [None] * self.depth
        if guard is not None and tape is not None:
            recording = recording_margins(self.__dict__.get("_rms_profile"), self.depth, unit,
                                          margin, tolerance, guard.policy.scale)
        for i, block in enumerate(self.blocks):
            if guard is not None and i > 0 and guard.policy.wants(i, xs):
                guard.anchors[i] = [t.clone() for t in xs]
            extra = self._block_inputs(i, side_inputs)
            prev = _sum(xs[1:], into=y0, kernels=kernels)
            ys = []
            patched = 0
            for j, f in enumerate(block):
                with seeded(seeds[i][j], devices), _site(tape, i, j, False, recording[i]):
                    out = f(prev, *extra)
                # A 16-bit output (autocast) into the float32 state: keep what the backward's
                # subtraction would not give back, so that it rebuilds the state exactly.
                patch = guard is not None and out.dtype != xs[j].dtype \
                    and out.dtype in (torch.float16, torch.bfloat16)
                before = xs[j].clone() if patch else None
                prev = _add(xs[j], out, into=None if state is None else state[j], kernels=kernels)
                if patch:
                    guard.patches[(i, j)] = exact_patch(before, prev, out)
                    patched += 1
                    del before
                ys.append(prev)
            if guard is not None:
                guard.policy.note_exact(i, patched == len(block))
            xs = ys
        # A fresh tensor: the output is saved for backward and handed on; it must outlive
        # this call's scratch.
        y = torch.cat(xs, dim=-1)
        if guard is not None:
            guard.predicted = guard.policy.finish(y)
            # The next step's recording margins start from this step's profile.
            self.__dict__["_rms_profile"] = list(guard.policy.rms)
            if tape is not None:
                tape.keep(block_margins(guard.predicted, margin, tolerance))
        return y

    def _new_guard(self, x: Tensor) -> Optional[ForwardGuard]:
        if not self.guarded:
            return None
        # the calibration the earlier backwards measured (drift.calibrated_scale)
        policy = AnchorPolicy(getattr(self, "anchors", None), list(x.chunk(self.groups, dim=-1)),
                              unit_roundoff(x.dtype),
                              getattr(self, "drift_tolerance", 1e-3) * ANCHOR_SHARE,
                              self.__dict__.get("_drift_scale", 1.0))
        return ForwardGuard(policy)


def _state_input(x: Tensor) -> Tensor:
    """The chain input as the coupling state: under autocast a 16-bit input is kept and rebuilt
    in float32 (the branches still run in the autocast dtype), since rebuilding block inputs by
    subtraction in 16-bit arithmetic loses most of their bits within a few blocks."""
    if x.dtype in (torch.float16, torch.bfloat16) and autocast_enabled(x.device):
        return x.float()
    return x


def _site(tape: Optional[ChoiceTape], block: int, group: int, replay: bool,
          margin: Optional[float] = None):
    """Where a branch call records (forward) or replays (backward) its discrete choices."""
    return contextlib.nullcontext() if tape is None else tape.site(block, group, replay, margin)


def _group_shaped(view: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """The arena's ``[rows, width]`` view reshaped to a group's shape (``[..., width]``)."""
    return None if view is None else view.view(like.shape)


def _groups_shaped(views: Sequence[Tensor], like: Tensor) -> list[Tensor]:
    return [v.view(like.shape) for v in views]


def _check_into(into: Tensor, a: Tensor, b: Tensor) -> None:
    # Type promotion must not be narrowed by the arena's dtype: that would change results.
    if torch.result_type(a, b) != into.dtype:
        raise RuntimeError(
            f"a reversible coupling update produces {torch.result_type(a, b)}, but the chain's "
            f"arena holds {into.dtype} (the chain input's dtype); the branch returns a dtype "
            "other than its input's. Compile with plan_memory=False, or make the branch keep "
            "the dtype.")


def _add(a: Tensor, b: Tensor, into: Optional[Tensor] = None, kernels: bool = False) -> Tensor:
    """``a + b``, written into ``into`` when given (``into`` may be ``a``); with ``kernels``
    by the Triton coupling kernel."""
    return _coupling(a, b, into, kernels, subtract=False)


def _sub(a: Tensor, b: Tensor, into: Optional[Tensor] = None, kernels: bool = False) -> Tensor:
    """``a - b``, written into ``into`` when given (``into`` may be ``a``); with ``kernels``
    by the Triton coupling kernel."""
    return _coupling(a, b, into, kernels, subtract=True)


def _coupling(a: Tensor, b: Tensor, into: Optional[Tensor], kernels: bool,
              subtract: bool) -> Tensor:
    if into is not None:
        _check_into(into, a, b)
    # The kernel writes through raw pointers, which autograd cannot record, and neither
    # broadcasts nor promotes: anything but equal shapes and dtypes outside autograd (a 16-bit
    # branch output under autocast, say) takes torch's path.
    if kernels and a.shape == b.shape and a.dtype == b.dtype and not (
            torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
        if into is None:
            into = torch.empty(a.shape, dtype=torch.result_type(a, b), device=a.device)
        update = coupling_sub_ if subtract else coupling_add_
        return update(into, a, b, backend="triton")
    op = torch.sub if subtract else torch.add
    return op(a, b) if into is None else op(a, b, out=into)


def _sum(tensors: Sequence[Tensor], into: Optional[Tensor] = None, kernels: bool = False
         ) -> Tensor:
    """y0 = x2 + ... + xG: with G = 2 that is x2 itself; with G > 2 a fresh tensor, or
    ``into``. The additions are the same, left to right, either way."""
    total = tensors[0]
    for t in tensors[1:]:
        total = _add(total, t, into=into, kernels=kernels)
    return total


class _ReversibleChainFunction(torch.autograd.Function):
    """Forward without grad keeping only the output; backward inverts block by block."""

    @staticmethod
    def forward(ctx, chain: ReversibleChain, n_side: int, x: Tensor, *rest):
        side_inputs = rest[:n_side]
        seeds = chain._draw_seeds()
        tape = chain._new_tape()
        fwd_guard = chain._new_guard(x)
        probe = None
        if fwd_guard is not None:  # a few rows of the input, to measure the drift at the end
            probe_at = fwd_guard.policy.rows
            probe = x.detach().reshape(-1, x.shape[-1]).index_select(0, probe_at)
        with torch.no_grad(), chain._scratch("forward", x) as scratch:
            y = chain._run_forward(x, side_inputs, seeds, scratch, tape, fwd_guard)
        ctx.chain = chain
        ctx.params = rest[n_side:]
        ctx.seeds = seeds
        ctx.autocast = capture_autocast(x.device)
        ctx.n_side = n_side
        ctx.tape = tape
        ctx.side_is_tensor = [isinstance(s, Tensor) for s in side_inputs]
        ctx.side_constants = [None if isinstance(s, Tensor) else s for s in side_inputs]
        side_tensors = [s for s in side_inputs if isinstance(s, Tensor)]
        ctx.n_side_tensors = len(side_tensors)
        kept = {} if fwd_guard is None else fwd_guard.anchors
        ctx.anchor_blocks = sorted(kept)
        ctx.predicted = None if fwd_guard is None else fwd_guard.predicted
        ctx.calibration = 1.0 if fwd_guard is None else fwd_guard.policy.scale
        guard = [] if fwd_guard is None else [probe_at, probe]
        guard += [t for i in ctx.anchor_blocks for t in kept[i]]
        ctx.patch_keys = [] if fwd_guard is None else sorted(fwd_guard.patches)
        guard += [t for key in ctx.patch_keys for t in fwd_guard.patches[key]]
        ctx.verify = bool(getattr(chain, "verify", False))
        if ctx.verify:
            guard.append(x.detach())
        ctx.n_guard = len(guard)
        # Records, anchors and probes go through save_for_backward, so memory accounting sees them.
        ctx.save_for_backward(y, *side_tensors, *guard, *([] if tape is None else tape.tensors()))
        return y

    @staticmethod
    @first_order_only("a reversible chain")
    def backward(ctx, grad_y: Tensor):
        chain: ReversibleChain = ctx.chain
        saved = ctx.saved_tensors
        y = saved[0].detach()
        tape: Optional[ChoiceTape] = ctx.tape
        first_guard = 1 + ctx.n_side_tensors
        guard = list(saved[first_guard:first_guard + ctx.n_guard])
        if tape is not None:
            tape.load(list(saved[first_guard + ctx.n_guard:]))
        anchors, patches = {}, {}
        if guard:
            G = chain.groups
            for n, i in enumerate(ctx.anchor_blocks):
                anchors[i] = guard[2 + n * G:2 + (n + 1) * G]
            start = 2 + len(ctx.anchor_blocks) * G
            for n, key in enumerate(ctx.patch_keys):
                patches[key] = guard[start + 2 * n:start + 2 * n + 2]
        tensors = iter(saved[1:1 + ctx.n_side_tensors])
        side_inputs = [next(tensors) if is_t else c
                       for is_t, c in zip(ctx.side_is_tensor, ctx.side_constants)]
        # Side tensors that need grad are differentiated through every block.
        side_leaves = [
            s.detach().requires_grad_() if isinstance(s, Tensor) and s.requires_grad else s
            for s in side_inputs
        ]
        params = ctx.params
        # Before the walk, so that they sit apart from each block's short-lived tensors.
        slots = GradientSlots([p for p in params if p.requires_grad]
                              + [s for s in side_leaves if isinstance(s, Tensor)
                                 and s.requires_grad])
        precision = None
        if guard:
            predicted = ctx.predicted
            margins = tape.block_margins.values() if tape is not None else ()
            precision = ChainPrecision(
                replay=None if tape is None else tape.stats, anchors=list(ctx.anchor_blocks),
                anchor_bytes=sum(t.numel() * t.element_size() for ts in anchors.values()
                                 for t in ts),
                patch_bytes=sum(t.numel() * t.element_size() for ts in patches.values()
                                for t in ts),
                predicted={i: float(predicted[i]) for i in [0, *ctx.anchor_blocks]},
                margins=(min(margins, default=0.0), max(margins, default=0.0)),
                short=list(tape.short) if tape is not None else [],
                calibration=ctx.calibration)
        with chain._scratch("backward", y) as scratch:
            grad_x = _chain_backward(ctx, chain, y, grad_y, side_leaves, slots, scratch,
                                     anchors, precision, guard[:2], patches)
        if tape is not None:
            tape.settle()
        if precision is not None and ctx.verify:
            precision.gradient_errors = _verify(ctx, chain, guard[-1], grad_y, side_inputs,
                                                grad_x, slots, params)
        if precision is not None:
            chain.last_precision = precision
            # The next forwards predict with what this one measured.
            chain.__dict__["_drift_scale"] = max(
                chain.__dict__.get("_drift_scale", 1.0),
                calibrated_scale(precision.calibration, precision.errors, precision.predicted))
            chain._warn_about(precision)
        side_grads = [slots.get(s) if isinstance(s, Tensor) else None for s in side_leaves]
        return (None, None, grad_x, *side_grads, *[slots.get(p) for p in params])


def _chain_backward(ctx, chain: ReversibleChain, y: Tensor, grad_y: Tensor, side_leaves: list,
                    grads_out: GradientSlots, scratch: Optional[CouplingScratch],
                    anchors: dict[int, list[Tensor]], precision: Optional[ChainPrecision],
                    probe: list[Tensor],
                    patches: Optional[dict[tuple[int, int], list[Tensor]]] = None) -> Tensor:
    """Walks the blocks last to first; accumulates the gradients of the side inputs and
    parameters in ``grads_out``; returns the gradient of the chain input. With ``scratch``,
    the rebuilt inputs go to ``scratch.state`` and the group gradients to ``scratch.grad``,
    updated in place. A block in ``anchors`` resumes from its exact input; the error of each
    rebuilt anchor, and of the rebuilt chain input on the ``probe`` rows (``[rows, values]``),
    goes to ``precision``."""
    G = chain.groups
    devices = [y.device]
    kernels = chain._use_kernels(y)
    # Contiguous groups with or without the arena (which copies them into its scratch below):
    # a layer may reduce a strided input in another order, and plan_memory must not change a
    # single bit of the result.
    ys = [t.contiguous() for t in y.chunk(G, dim=-1)] if scratch is None else list(y.chunk(G, dim=-1))
    gys = list(grad_y.chunk(G, dim=-1))
    state = grad = y0 = None
    if scratch is not None:
        state = _groups_shaped(scratch.state, ys[0])
        grad = _groups_shaped(scratch.grad, ys[0])
        y0 = _group_shaped(scratch.y0, ys[0])
        arena_storage = scratch.state[0].untyped_storage().data_ptr()
        # The last block reads the chain output's groups from the arena: a column chunk of y is
        # strided, and layers such as LayerNorm copy a strided input (one more [N, D/G]
        # tensor at the step's peak). The inverse then overwrites them in place, as it does
        # for every earlier block.
        for j in range(G):
            state[j].copy_(ys[j])
        ys = list(state)
    with frozen_running_stats(chain):
        for i in range(chain.depth - 1, -1, -1):
            block = chain.blocks[i]
            extra = chain._block_inputs(i, side_leaves)
            extra_grad = [(k, s) for k, s in zip(chain.side_index[i], extra)
                          if isinstance(s, Tensor) and s.requires_grad]
            xs: list[Tensor | None] = [None] * G
            group_errors: list[tuple[float, float]] = []
            for j in range(G - 1, -1, -1):
                f = block[j]
                f_params = [p for p in f.parameters() if p.requires_grad]
                inp = (ys[j - 1] if j > 0 else _sum(xs[1:], into=y0, kernels=kernels)
                       ).detach().requires_grad_()
                with torch.enable_grad(), seeded(ctx.seeds[i][j], devices), \
                        _site(ctx.tape, i, j, replay=True), restored_autocast(ctx.autocast):
                    out = f(inp, *extra)
                wrt = [inp] + [s for _, s in extra_grad] + f_params
                # Under autocast the branch output is 16-bit and the coupling state float32:
                # its gradient enters the branch in the output's dtype, as autograd would pass it.
                grads = list(torch.autograd.grad(out, wrt, gys[j].to(out.dtype),
                                                 allow_unused=True))
                if scratch is not None:
                    # A branch that passes its gradient through (out = inp + s) returns the
                    # arena's own view; what leaves this call must not alias the arena.
                    grads[1:] = [g.clone() if g is not None and g.layout == torch.strided
                                 and g.untyped_storage().data_ptr() == arena_storage else g
                                 for g in grads[1:]]
                # The inverse, after the gradient: an in-place write into the arena before it
                # would bump the version of `inp`, which the branch saved.
                xs[j] = _sub(ys[j], out.detach(), into=None if state is None else state[j],
                             kernels=kernels)
                if patches and (i, j) in patches:  # the elements the subtraction rounds
                    positions, values = patches[(i, j)]
                    xs[j].view(-1)[positions.long()] = values
                if i in anchors:  # measure the drift, then resume from the exact input
                    exact = anchors[i][j]
                    group_errors.append(_squared_norms(xs[j], exact))
                    xs[j] = exact if state is None else state[j].copy_(exact)
                g_inp = grads[0]
                if g_inp is not None:
                    if j > 0:
                        gys[j - 1] = _add(gys[j - 1], g_inp,
                                          into=None if grad is None else grad[j - 1],
                                          kernels=kernels)
                    else:  # y0 = x2 + ... + xG feeds the first group
                        for k in range(1, G):
                            gys[k] = _add(gys[k], g_inp, into=None if grad is None else grad[k],
                                          kernels=kernels)
                for (_, s), g in zip(extra_grad, grads[1:1 + len(extra_grad)]):
                    if g is not None:
                        grads_out.accumulate(s, g)
                for p, g in zip(f_params, grads[1 + len(extra_grad):]):
                    if g is not None:
                        grads_out.accumulate(p, g)
                # g_inp too: else it pins an [N, D/G] gradient through the next recompute.
                del out, grads, g_inp
            if group_errors and precision is not None:
                precision.errors[i] = _joint_error(group_errors)
            ys = xs  # this block's input is the previous block's output
    if probe and precision is not None:
        rows, exact = probe
        rebuilt = torch.cat([t.reshape(-1, t.shape[-1]).index_select(0, rows) for t in ys], -1)
        precision.errors[0] = relative_error(rebuilt, exact)
    # A fresh tensor, like the forward's output.
    return torch.cat(gys, dim=-1)


def _verify(ctx, chain: ReversibleChain, x: Tensor, grad_y: Tensor, side_inputs: list,
            grad_x: Tensor, slots: GradientSlots, params) -> dict[str, float]:
    """Relative error of each gradient the reversible backward produced (the chain input's as
    ``"input"``, each parameter's by name) against the chain run storing everything."""
    leaf = x.detach().requires_grad_()
    wanted = [p for p in params if p.requires_grad]
    with torch.enable_grad(), frozen_running_stats(chain), restored_autocast(ctx.autocast):
        out = chain.forward_storing_everything(leaf, *side_inputs, seeds=ctx.seeds)
        reference = torch.autograd.grad(out, [leaf, *wanted], grad_y, allow_unused=True)
    names = {id(p): n for n, p in chain.named_parameters()}
    errors = {"input": relative_error(grad_x, reference[0])}
    for p, ref in zip(wanted, reference[1:]):
        mine = slots.get(p)
        if ref is None or mine is None:
            errors[names.get(id(p), "?")] = 0.0 if ref is None and mine is None else math.inf
        else:
            errors[names.get(id(p), "?")] = relative_error(mine, ref)
    return errors


def _squared_norms(rebuilt: Tensor, exact: Tensor) -> tuple[float, float]:
    """``(|rebuilt - exact|^2, |exact|^2)``, in float64."""
    diff = float(torch.linalg.vector_norm(rebuilt.double() - exact.double())) ** 2
    return diff, float(torch.linalg.vector_norm(exact.double())) ** 2


def _joint_error(parts: list[tuple[float, float]]) -> float:
    """``rms(difference) / rms(exact)`` over all groups of a block input."""
    diff = math.sqrt(sum(d for d, _ in parts))
    scale = math.sqrt(sum(e for _, e in parts))
    return diff / scale if scale else (0.0 if diff == 0.0 else math.inf)
