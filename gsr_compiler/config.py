"""The options of :func:`gsr_compiler.gsr_compile`, gathered in one dataclass."""
from __future__ import annotations

from dataclasses import dataclass, fields

from torch import nn

from .errors import GSRCompileError
from .runtime.drift import check_anchors
from .runtime.kernels import BACKENDS


def default_sparse_k(width: int, groups: int) -> int:
    """The ``sparse_k`` that ``gsr demo`` and ``gsr train --gsr`` use: half of each top-k
    group (g = width/groups). Of g/2, g/4 and g/8 it is the only one within 0.02 Kendall of
    dense ReLU on both circuit labels (docs/sparse_quality.md)."""
    return max(1, width // groups // 2)


#: The values of ``GSRConfig.coupling``.
COUPLINGS = ("auto", "grouped", "two-stream")


@dataclass(frozen=True)
class GSRConfig:
    """Options of the GSR rewrite.

    Attributes:
        groups: number of channel groups G of each reversible block (>= 2). Every
            residual block ``h + f(h)`` of width D becomes grouped additive coupling
            with G copies of ``f`` at width D/G.
        coupling: how a residual chain becomes reversible. ``"grouped"``: grouped additive
            coupling, each branch split into ``groups`` narrower copies with fresh weights
            (every layer of the chain needs a width rule; a layer without one is an error that
            names it). ``"two-stream"``: two full-width streams that take turns, running the
            user's own layers with their own weights, whatever they are
            (:mod:`~gsr_compiler.runtime.two_stream`). ``"auto"`` (default): grouped for a
            chain whose every layer has a width rule, two-stream for the others. Both change
            the function (docs/runtime.md says how); ``explain()`` says which each chain uses.
        strict: raise :class:`GSRCompileError` when anything is left unconverted,
            instead of reporting it in ``explain()``.
        min_chain_blocks: shortest run of residual blocks that is made reversible.
        sparse_k: turns on the group-wise sparse nonlinearity: inside every reversible
            branch, each ReLU is replaced by a top-k that keeps, per node and channel group
            of ``sparse_group`` channels, the ``sparse_k`` largest values (MaxK-style), and
            the op right after it (Linear, GCNConv, SAGEConv, GraphConv, GINConv) reads the
            compressed form. ``None`` (default) leaves activations as they are. Must lie in
            ``1..sparse_group``; checked when the model is compiled.
        sparse_group: channel-group width ``g`` of the top-k; must divide the width of one
            reversible group. ``None`` (default): the width of one reversible group (D/groups).
        plan_memory: run the reversible chains' coupling in place in one planned arena (the
            groups between blocks and their gradients), allocated once per input size and reused
            across steps, instead of a fresh tensor per update. Results are the same bit for bit;
            ``False`` turns it off for comparison. ``explain()`` reports the plan either way.
        recompute_head: the row-wise layers that read a chain's output (a model head such as
            ``decoder(relu(norm(h)))``: Linear, LayerNorm, elementwise activations) run over
            blocks of rows and are recomputed in backward, keeping only the chain output, which
            the chain keeps anyway (default ``True``). The same function; ``explain()`` lists
            each such run. ``False`` leaves them to autograd, for comparison.
        backend: who runs the coupling update and inverse of the chains and, with ``sparse_k``,
            the group top-k and the compressed sum/mean aggregation: ``"auto"`` (default) the
            Triton kernels on CUDA tensors when triton is importable and torch otherwise,
            ``"torch"`` always torch, ``"triton"`` always the kernels (on CPU tensors only in
            Triton's interpreter, ``TRITON_INTERPRET=1``; otherwise compiling raises). The
            coupling and the top-k give the same results as torch; the aggregation and the fused
            LayerNorm + top-k agree to float tolerance (they sum in another order).
            ``explain()`` says what runs.
        replay_margin: the backward recompute of a reversible block runs on a rebuilt input
            that differs from the forward's by rounding; a discrete choice within that distance
            of its boundary (a ReLU's sign, a top-k's kept set) could flip and make the
            gradients wrong. The forward records the choices whose relative margin is below
            four times the rebuild error it predicts for their block, and at least below
            ``replay_margin``; the recompute repeats them, counts unrecorded choices that came
            within half the margin, and warns (docs/exactness.md). ``None`` turns recording and
            checking off.
        anchors: where the forward keeps a block's exact input for the backward to resume
            from, so that reconstruction error cannot compound past one segment: ``"auto"``
            (default) where the rebuild error predicted from the state's growth (calibrated by
            what earlier backwards measured) would pass half of ``drift_tolerance``, an int every that many blocks, ``None`` never. Each anchor
            keeps one ``[N, D]`` state. ``explain()`` and ``precision_report()`` list them.
        drift_tolerance: warn (``GSRPrecisionWarning``, once per chain) when a backward
            measures a relative reconstruction error above this at an anchor or at the chain
            input; ``"auto"`` anchors keep the predicted error under half of it. Deep
            ill-conditioned models need 1e-5 for exact gradients (docs/exactness.md).
        verify: every backward of a reversible chain also runs it storing everything and
            measures each gradient's relative error against that (``precision_report()``;
            warns above ``drift_tolerance``). It costs the plain model's memory and time: turn
            it on to check a model, not to train it. For a one-off check of the whole model
            use ``gsr_model.verify_gradients(...)``.
        leaf_modules: submodules to keep whole: called as written, never traced into nor
            converted. Module types (``AtomEncoder``) or qualified names as
            ``model.named_modules()`` gives them (``"encoder"``, ``"layers.3"``). Submodules whose
            tracing fails are kept whole anyway (a graph break, listed by ``explain()``); name
            one here to keep it whole from the start.
        memory_budget: bytes one training step may use (parameters, gradients, Adam's state,
            inputs, arena and activations), an int or a string such as ``"6GiB"``, ``"512MiB"``
            or ``"1.5GB"``. At compile time (``example_inputs=`` is then required) the options
            the compiler controls (``recompute_head``, ``plan_memory``, ``groups``, ``sparse_k``)
            are chosen, cheapest in extra compute first, so that the step peak predicted at the
            traced size fits; ``explain()`` reports the choice. When none fits, compiling raises
            with the predicted minimum and the largest graph that would fit
            (docs/memory-budget.md). ``None`` (default): no budget.
    """

    groups: int = 2
    coupling: str = "auto"
    strict: bool = False
    min_chain_blocks: int = 1
    sparse_k: int | None = None
    sparse_group: int | None = None
    plan_memory: bool = True
    recompute_head: bool = True
    backend: str = "auto"
    replay_margin: float | None = 1e-4
    anchors: str | int | None = "auto"
    drift_tolerance: float = 1e-3
    verify: bool = False
    leaf_modules: tuple = ()
    memory_budget: int | str | None = None

    def __post_init__(self) -> None:
        self._check_leaf_modules()
        if self.memory_budget is not None:
            from .budget import parse_budget

            try:  # normalized to bytes, so that configs compare alike
                object.__setattr__(self, "memory_budget", parse_budget(self.memory_budget))
            except ValueError as e:
                raise GSRCompileError(str(e)) from None
        if not isinstance(self.backend, str) or self.backend not in BACKENDS:
            raise GSRCompileError(
                f"backend={self.backend!r}: must be one of "
                f"{', '.join(repr(b) for b in BACKENDS)} ('auto': Triton kernels on CUDA tensors, "
                "torch otherwise; 'torch': always torch; 'triton': always the kernels)."
            )
        if not isinstance(self.coupling, str) or self.coupling not in COUPLINGS:
            raise GSRCompileError(
                f"coupling={self.coupling!r}: must be one of "
                f"{', '.join(repr(c) for c in COUPLINGS)} ('grouped': split each branch into "
                "narrower groups; 'two-stream': the user's own layers at full width in two "
                "streams; 'auto': grouped where every layer has a width rule).")
        for name in ("plan_memory", "recompute_head", "verify"):
            if not isinstance(getattr(self, name), bool):
                raise GSRCompileError(f"{name}={getattr(self, name)!r}: must be True or False.")
        if not isinstance(self.groups, int) or isinstance(self.groups, bool) or self.groups < 2:
            raise GSRCompileError(
                f"groups={self.groups!r}: grouped reversible coupling needs at least 2 channel "
                "groups (one group cannot be inverted from its own output). Use groups=2 or more."
            )
        if not isinstance(self.min_chain_blocks, int) or self.min_chain_blocks < 1:
            raise GSRCompileError(
                f"min_chain_blocks={self.min_chain_blocks!r}: must be a positive integer."
            )
        for name in ("sparse_k", "sparse_group"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise GSRCompileError(
                    f"{name}={value!r}: must be a positive integer, or None"
                    + (" to leave activations dense." if name == "sparse_k"
                       else " for the width of one reversible group.")
                )
        margin = self.replay_margin
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                                   or not 0 <= margin < 1 or margin != margin):
            raise GSRCompileError(
                f"replay_margin={margin!r}: must be a number in [0, 1) (a relative margin, "
                "default 1e-4), or None to record no discrete choices.")
        try:
            check_anchors(self.anchors)
        except ValueError as e:
            raise GSRCompileError(str(e)) from None
        tol = self.drift_tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
            raise GSRCompileError(f"drift_tolerance={tol!r}: must be a positive number "
                                  "(a relative error, default 1e-3).")
        if self.sparse_group is not None and self.sparse_k is None:
            raise GSRCompileError(
                f"sparse_group={self.sparse_group} is set but sparse_k is None, so nothing would "
                "be made sparse; set sparse_k (values kept per node and group) as well."
            )
        if self.sparse_group is not None and self.sparse_k > self.sparse_group:
            raise GSRCompileError(
                f"sparse_k={self.sparse_k} must be in 1..sparse_group={self.sparse_group} "
                "(it is the number of values kept out of each group of sparse_group channels)."
            )

    def _check_leaf_modules(self) -> None:
        leaves = self.leaf_modules
        if isinstance(leaves, (str, type)):
            leaves = (leaves,)
        if not isinstance(leaves, (tuple, list, set, frozenset)):
            raise GSRCompileError(
                f"leaf_modules={self.leaf_modules!r}: must be a list of module types or qualified "
                "module names, e.g. leaf_modules=[AtomEncoder, 'layers.3'].")
        for leaf in leaves:
            if not (isinstance(leaf, str) and leaf) and not (
                    isinstance(leaf, type) and issubclass(leaf, nn.Module)):
                raise GSRCompileError(
                    f"leaf_modules contains {leaf!r}: each entry must be an nn.Module subclass or "
                    "a qualified module name (a non-empty str such as 'encoder' or 'layers.3').")
        # frozen: normalize through object.__setattr__ so configs compare and hash alike
        object.__setattr__(self, "leaf_modules", tuple(leaves))

    def guard_options(self) -> dict:
        """The reversible chains' constructor arguments for replay, anchors and drift."""
        return {"replay_margin": self.replay_margin, "anchors": self.anchors,
                "drift_tolerance": self.drift_tolerance, "verify": self.verify}

    @classmethod
    def from_options(cls, config: "GSRConfig | None" = None, **options) -> "GSRConfig":
        """Builds a config from keyword options, naming any unknown option."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise GSRCompileError(
                f"unknown option(s) {', '.join(unknown)}; gsr_compile accepts: {', '.join(sorted(known))}."
            )
        if config is None:
            return cls(**options)
        merged = {f.name: getattr(config, f.name) for f in fields(cls)}
        merged.update(options)
        return cls(**merged)
