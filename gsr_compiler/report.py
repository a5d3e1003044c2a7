"""What a compilation did, as printed by ``GSRModule.explain()``."""
from __future__ import annotations

from dataclasses import dataclass, field


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@dataclass
class ChainReport:
    name: str
    first_module: str
    last_module: str
    depth: int
    width: int
    groups: int
    side_inputs: list[str]
    stored_bytes_plain: int
    stored_bytes_reversible: int
    # "grouped", "two-stream" or "recompute"; why grouped was not used ("" when two-stream was
    # asked for).
    coupling: str = "grouped"
    coupling_reason: str = ""


@dataclass
class MemoryPlanReport:
    """The planned arena of one step at the traced input size, against its lower bound.

    ``planned_bytes``/``lower_bound`` cover every activation of the step (the liveness of the
    rewritten graph); ``arena_bytes``/``arena_lower_bound`` the part the runtime keeps in the
    arena (the chains' coupling scratch), which it allocates when ``plan_memory`` is on.
    """

    training: bool
    num_nodes: int
    num_edges: int
    intervals: int
    planned_bytes: int
    lower_bound: int
    arena_buffers: int
    arena_bytes: int
    arena_lower_bound: int
    plan_memory: bool
    notes: list[str] = field(default_factory=list)

    @property
    def gap_percent(self) -> float:
        return 0.0 if not self.lower_bound else \
            100.0 * (self.planned_bytes - self.lower_bound) / self.lower_bound

    @property
    def arena_gap_percent(self) -> float:
        return 0.0 if not self.arena_lower_bound else \
            100.0 * (self.arena_bytes - self.arena_lower_bound) / self.arena_lower_bound

    def lines(self) -> list[str]:
        what = "one training step" if self.training else "one forward"
        out = [
            f"memory plan ({what} at N={self.num_nodes}, E={self.num_edges}):",
            f"  activations: {self.intervals} live intervals, planned {format_bytes(self.planned_bytes)}, "
            f"lower bound {format_bytes(self.lower_bound)} (peak of live bytes), "
            f"gap {self.gap_percent:.1f}%",
        ]
        if self.arena_buffers:
            state = "allocated at run time" if self.plan_memory else "off: plan_memory=False"
            out.append(
                f"  arena ({state}): coupling scratch of the chains, {self.arena_buffers} buffers, "
                f"{format_bytes(self.arena_bytes)}, lower bound "
                f"{format_bytes(self.arena_lower_bound)}, gap {self.arena_gap_percent:.1f}%")
        out += [f"  note: {n}" for n in self.notes]
        return out


@dataclass
class KernelBackendReport:
    """Who runs the ops that have Triton kernels (``GSRConfig.backend``) for the traced inputs."""

    requested: str
    runs: str      # "triton" or "torch"
    reason: str
    routed: str    # the ops of this graph that have kernels
    cpu_topk: str | None = None  # how group top-k selects on CPU, where the graph has top-k

    def lines(self) -> list[str]:
        out = [f"kernels: {self.runs} (backend={self.requested!r}: {self.reason})",
               f"  {self.routed}"]
        if self.requested == "auto":
            out.append("  'auto' is decided per call from the tensors' device: Triton on CUDA, "
                       "torch on CPU")
        if self.cpu_topk is not None:
            out.append(f"  group top-k on CPU (float32): {self.cpu_topk}")
        return out


@dataclass
class PrecisionReport:
    """How the chains keep their backward exact (``GSRConfig`` replay_margin, anchors,
    drift_tolerance, verify) and, after a backward, what it kept and measured."""

    replay_margin: float | None
    anchors: str | int | None
    drift_tolerance: float
    verify: bool
    last_step: str | None = None

    def lines(self) -> list[str]:
        replay = ("off" if self.replay_margin is None else
                  f"ReLU signs and top-k selections within {self.replay_margin:g} (relative) of "
                  "flipping are recorded in the forward and repeated in the backward")
        anchors = {None: "none", "auto": "where the state grows (auto)"}.get(
            self.anchors, f"every {self.anchors} blocks")
        out = ["exactness of the reversible backward:",
               f"  replay: {replay}",
               f"  anchors (exact block inputs kept): {anchors}; warn above a relative "
               f"reconstruction error of {self.drift_tolerance:g}"
               + ("; verify: on (every backward is checked against storing everything)"
                  if self.verify else "")]
        if self.last_step:
            out.append("  last backward:")
            out += [f"    {line}" for line in self.last_step.splitlines()]
        else:
            out.append("  last backward: none yet (precision_report() after a step)")
        return out


@dataclass
class CompileReport:
    """The passes run, the chains converted, what was left alone and why."""

    model_name: str
    mode: str
    passes: list[tuple[str, list[str]]] = field(default_factory=list)
    chains: list[ChainReport] = field(default_factory=list)
    not_converted: list[tuple[str, str]] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    compile_seconds: float = 0.0
    memory: MemoryPlanReport | None = None
    backend: KernelBackendReport | None = None
    precision: PrecisionReport | None = None
    leaves: list = field(default_factory=list)       # tracer.LeafRecord: modules kept whole
    checkpoints: list[str] = field(default_factory=list)  # what became of checkpoint() calls

    @property
    def converted(self) -> bool:
        return bool(self.chains)

    def __str__(self) -> str:
        lines = [f"gsr_compile({self.model_name}) [{self.mode} mode, {self.compile_seconds:.2f} s]"]
        lines.append("passes:")
        for name, notes in self.passes:
            if len(notes) > 1:  # one line each (e.g. one per chain)
                lines += [f"  {name}:"] + [f"    {n}" for n in notes]
            else:
                lines.append(f"  {name}" + (f": {notes[0]}" if notes else ""))
        if self.chains:
            lines.append("reversible chains:")
            for c in self.chains:
                side = ", ".join(c.side_inputs) or "none"
                if c.coupling == "recompute":
                    how = ("recomputed in the backward from its kept input: the model's own "
                           f"layers at width {c.width}, the same function")
                    if c.coupling_reason:
                        how += f" (grouped impossible: {c.coupling_reason})"
                elif c.coupling == "two-stream":
                    how = (f"two-stream coupling: the model's own layers at full width {c.width}, "
                           "two streams")
                    if c.coupling_reason:
                        how += f" (grouped impossible: {c.coupling_reason})"
                else:
                    how = (f"grouped coupling: width {c.width} = {c.groups} groups x "
                           f"{c.width // c.groups}")
                lines.append(
                    f"  {c.name}: {c.depth} block(s) '{c.first_module}' .. '{c.last_module}', "
                    f"{how}, side inputs: {side}"
                )
            plain = sum(c.stored_bytes_plain for c in self.chains)
            rev = sum(c.stored_bytes_reversible for c in self.chains)
            lines.append(
                f"expected activations kept for backward by the chains: {format_bytes(plain)} "
                f"(eager, estimated from the traced shapes) -> {format_bytes(rev)} (reversible)"
            )
            if any(c.coupling == "grouped" for c in self.chains):
                lines.append(
                    "note: grouped coupling is a different architecture than the residual chain; "
                    "its branches are fresh copies at 1/groups width, so the compiled model "
                    "computes a different function and must be trained (weights were not "
                    "transferred)."
                )
            if any(c.coupling == "two-stream" for c in self.chains):
                lines.append(
                    "note: two-stream coupling keeps the model's layers, weights and state_dict "
                    "keys, and every branch still adds to the output once, but from the third "
                    "block on each branch reads the input plus only every other earlier branch "
                    "output: a different function from the residual chain (the same for chains "
                    "of 1 or 2 blocks); a plain checkpoint loads, and is a starting point, not "
                    "the same model (docs/runtime.md)."
                )
        else:
            lines.append("no residual chain was converted; the model runs as written.")
        if self.leaves:
            lines.append("kept whole (called as written, not traced into nor converted):")
            lines += [f"  {leaf.describe()}" for leaf in self.leaves]
        if self.checkpoints:
            lines.append("torch.utils.checkpoint calls:")
            lines += [f"  {c}" for c in self.checkpoints]
        if self.not_converted:
            lines.append("not converted:")
            for where, why in self.not_converted:
                lines.append(f"  {where}: {why}")
            if any("no width rule" in why for _, why in self.not_converted):
                from .passes.narrow_width import supported_module_names

                lines.append(f"  supported layers: {', '.join(supported_module_names())}")
        change = (self.params_after - self.params_before) / max(self.params_before, 1) * 100
        lines.append(
            f"parameters: {self.params_before:,} before -> {self.params_after:,} after ({change:+.1f}%)"
        )
        if self.backend is not None:
            lines += self.backend.lines()
        if self.memory is not None:
            lines += self.memory.lines()
        if self.precision is not None and self.chains:
            lines += self.precision.lines()
        return "\n".join(lines)
