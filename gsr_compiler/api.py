"""``gsr_compile``: the entry point, and the module it returns."""
from __future__ import annotations

import contextlib
import inspect
import time
from typing import Any, Iterator

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_manager import PassManager

from .config import GSRConfig
from .data_inputs import MissingDataAttribute, flatten_arguments, split_data_arguments
from .errors import GSRCompileError, LayerFailedError
from .input_errors import check_edge_index, check_inputs
from .passes.branch_dropout import BranchDropoutPass
from .passes.check_chain_precision import CheckChainPrecision
from .passes.recompute_rowwise_head import RecomputeRowwiseHead
from .passes.eliminate_dead_code import EliminateDeadCode
from .passes.find_residual_chains import FindResidualChains
from .passes.functional_dropout_to_module import FunctionalDropoutToModule
from .passes.group_sparse_activation import GroupSparseActivation
from .passes.activation_liveness import ActivationLiveness, attribute_or_none
from .passes.narrow_width import supported_module_names
from .passes.plan_activation_memory import PlanActivationMemory
from .passes.propagate_shapes import PropagateShapes, state_preserved
from .passes.remove_no_ops import RemoveNoOps
from .passes.replay_discrete_choices import ReplayDiscreteChoices
from .passes.reversible_rewrite import ReversibleRewrite
from .passes.select_kernel_backend import SelectKernelBackend, describe_routed
from .report import (ChainReport, CompileReport, KernelBackendReport, MemoryPlanReport,
                     PrecisionReport)
from .runtime.arena import ArenaPlan
from .runtime.arena.coupling_arena import CouplingArena
from .runtime.kernels import BackendChoice, choose_backend
from .runtime.native import native_topk_available, native_topk_status
from .runtime.reversible import ReversibleChain
from .runtime.sparse import GroupTopK, GroupTopKCompress
from .passes.restore_checkpoints import RestoreCheckpoints
from .peak import PeakPredictor, StepPeak
from .tracer import (_ALREADY_REVERSIBLE, TraceFindings, check_leaf_modules,
                     split_call_arguments, trace)

_CONCRETE_TYPES = (type(None), bool, int, float, str)


def _specialization(concrete: dict[str, Any]) -> tuple:
    """A hashable key for the non-tensor arguments a graph was traced with."""
    def ok(v):
        return isinstance(v, _CONCRETE_TYPES) or (
            isinstance(v, tuple) and all(isinstance(x, _CONCRETE_TYPES) for x in v)
        )
    for name, value in concrete.items():
        if not ok(value):
            raise GSRCompileError(
                f"argument '{name}' is a {type(value).__name__}; gsr_compile traces tensor "
                "and PyG Data arguments and specializes on None, bool, int, float and str "
                "ones. Pass the tensors themselves instead."
            )
    return tuple(sorted(concrete.items()))


def _count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


class GSRModule(nn.Module):
    """A model compiled to GSR form. Behaves like the original ``nn.Module``.

    Tracing happens on the first call (with the real inputs), or at construction when
    ``example_inputs`` is given, and again when the mode (``train()``/``eval()``) or a
    non-tensor argument changes. All traces share one set of parameters.
    """

    def __init__(self, model: nn.Module, config: GSRConfig,
                 example_inputs: tuple | None = None, example_kwargs: dict | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise GSRCompileError(f"gsr_compile expects an nn.Module, got {type(model).__name__}")
        self.config = config
        self.source = model  # registered until compiled, so .to()/.train() reach it
        self.compiled: fx.GraphModule | None = None
        self.__dict__["_graphs"] = {}
        self.__dict__["_reports"] = {}
        self.__dict__["_registry"] = {}
        self.__dict__["_liveness"] = {}
        self.__dict__["_last_key"] = None
        # One arena for all chains and traces of this model (plain attribute: not state).
        self.__dict__["_coupling_arena"] = CouplingArena() if config.plan_memory else None
        self.train(model.training)
        if example_inputs is not None:
            args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
            self._graph_for(args, example_kwargs or {})

    # -- calling -----------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        gm, values = self._graph_for(args, kwargs)
        return gm(*values)

    def _graph_for(self, args: tuple, kwargs: dict) -> tuple[fx.GraphModule, list]:
        source = self._source_model
        _, concrete, _ = split_call_arguments(source, args, kwargs)
        concrete, data_signatures = split_data_arguments(concrete)
        parameters = list(inspect.signature(source.forward).parameters)
        arguments = _bind(source, args, kwargs)
        names, bound = flatten_arguments(parameters, arguments, data_signatures)
        # guards read the graph's inputs by placeholder name (a Data's tensors: data_x, ...)
        inputs = {n: v for n, v in zip(names, bound) if isinstance(v, torch.Tensor)}
        base = _specialization(concrete) + tuple(
            sorted(data_signatures.items(), key=lambda item: item[0]))
        key = self._cached_key(self.training, base, inputs)
        if key is None:
            data_args = {n: v for n, v in zip(parameters, arguments) if n in data_signatures}
            # Compiling runs the model on the real inputs (shape propagation, dropout
            # included): it must not move the caller's random streams, or the first call
            # would draw other dropout masks than the model as written.
            devices = sorted({t.device.index or 0 for t in inputs.values()
                              if t.device.type == "cuda"})
            try:
                with torch.random.fork_rng(devices=devices):
                    key = self._compile(self.training, base, concrete, names, bound, inputs,
                                        data_args)
            except LayerFailedError as e:
                raise _whose_failure(source, e, args, kwargs, self.training) from e.__cause__
        gm = self._graphs[key]
        if gm.training != self.training:
            gm.train(self.training)
        self.__dict__["_last_key"] = key
        return gm, bound

    def _cached_key(self, mode: bool, base: tuple, inputs: dict) -> tuple | None:
        """The key of a graph traced for this mode and these non-tensor arguments whose
        guards (facts decided at trace time: shapes, requires_grad) hold for ``inputs``."""
        guards = self.__dict__.setdefault("_guards", {})
        for key in self._graphs:
            mine = guards.get(key, [])
            if key[0] != mode or key[1][:len(base)] != base or \
                    len(key[1]) != len(base) + len(mine):
                continue
            if all(g.holds(inputs, self._source_model) for g in mine):
                return key
        return None

    def _compile(self, mode: bool, base: tuple, concrete: dict, names: list[str], values: list,
                 inputs: dict, data_args: dict[str, Any]) -> tuple:
        """Traces and rewrites the model for one mode and set of non-tensor arguments;
        returns the key the graph is stored under (``base`` plus the trace's guards)."""
        start = time.perf_counter()
        source = self._source_model
        check_inputs(source, names, values)
        check_leaf_modules(source, self.config.leaf_modules)
        backend = _choose_backend(self.config.backend, values, source)
        was_training = source.training
        source.train(mode)
        try:
            gm = trace(source, concrete, inputs, self.config.leaf_modules, data_args)
        except GSRCompileError as e:
            if isinstance(e.__cause__, MissingDataAttribute):
                raise e.__cause__ from None  # the AttributeError eager raises for a key the Data lacks
            raise
        finally:
            source.train(was_training)
        findings: TraceFindings = gm.meta["gsr_trace"]
        key = (mode, base + tuple((f"guard: {g.description}", g.value) for g in findings.guards))
        check_edge_index(gm, values)  # after tracing: only an edge_index a PyG layer reads as is
        gm.train(mode)
        config = self.config
        finder = FindResidualChains(config.groups, config.min_chain_blocks, config.coupling)
        passes = [
            FunctionalDropoutToModule(mode),
            RemoveNoOps(),
            EliminateDeadCode(),
            PropagateShapes([v for v in values]),
            finder,
            ReversibleRewrite(finder, config.groups, self._registry, config.guard_options()),
        ]
        if config.sparse_k is not None:
            passes.append(GroupSparseActivation(config.sparse_k, config.sparse_group))
        passes.append(BranchDropoutPass())
        if config.replay_margin is not None:
            passes.append(ReplayDiscreteChoices())
        passes.append(CheckChainPrecision())
        if config.recompute_head:
            passes.append(RecomputeRowwiseHead(self._registry))
        kernels = SelectKernelBackend(backend)
        planner = PlanActivationMemory(mode, self.coupling_arena)
        restore = RestoreCheckpoints()
        passes += [kernels, planner, restore]
        with _reversible_modules_kept_inputs(gm):
            _run_passes(passes, gm)
        report = self._report(gm, passes, finder, mode, time.perf_counter() - start)
        report.leaves = list(findings.leaves)
        report.checkpoints = _checkpoint_lines(findings, restore)
        if config.strict and (report.not_converted or not report.chains):
            raise GSRCompileError(
                "strict=True and the model was not fully converted:\n"
                + "\n".join(f"  {w}: {r}" for w, r in report.not_converted)
                + f"\nsupported modules: {', '.join(supported_module_names())}"
            )
        report.memory = _memory_report(planner, config.plan_memory)
        report.precision = PrecisionReport(config.replay_margin, config.anchors,
                                           config.drift_tolerance, config.verify)
        report.backend = KernelBackendReport(backend.requested, backend.name, backend.reason,
                                             describe_routed(kernels.routed), _cpu_topk(gm))
        gm = self._adopt(gm)
        gm.train(mode)
        self._graphs[key] = gm
        self._reports[key] = report
        self.__dict__.setdefault("_liveness", {})[key] = planner.liveness
        self.__dict__.setdefault("_guards", {})[key] = list(findings.guards)
        return key

    def _adopt(self, gm: fx.GraphModule) -> fx.GraphModule:
        """Makes ``gm`` share the parameters of the first compiled graph."""
        if self.compiled is None:
            source = self._source_model
            del self._modules["source"]
            self.__dict__["_source"] = source
            self.compiled = gm
            return gm
        root = self.compiled
        owned = {id(t) for t in (*root.parameters(), *root.buffers())}
        for node in gm.graph.nodes:
            if node.op not in ("call_module", "get_attr"):
                continue
            mine = attribute_or_none(gm, node.target)
            theirs = attribute_or_none(root, node.target)
            if theirs is mine:
                continue
            # A module holding no state of its own (or only the model's, as a checkpointed
            # function's region holds the user's layers) may differ in identity between traces.
            stateless = isinstance(mine, nn.Module) and all(
                id(t) in owned for t in (*mine.parameters(), *mine.buffers()))
            if theirs is None and stateless:
                root.add_submodule(node.target, mine)
            elif not (stateless and type(theirs) is type(mine) and repr(theirs) == repr(mine)):
                raise GSRCompileError(
                    f"'{node.target}' differs between traces (train/eval mode or non-tensor "
                    "arguments change which layers run); gsr_compile needs one set of layers "
                    "for every mode. Move the mode-dependent choice inside a submodule."
                )
        return fx.GraphModule(root, gm.graph, gm.__class__.__name__)

    def _report(self, gm, passes, finder, mode: bool, seconds: float) -> CompileReport:
        report = CompileReport(model_name=type(self._source_model).__name__,
                               mode="train" if mode else "eval", compile_seconds=seconds)
        for p in passes:
            report.passes.append((type(p).__name__, list(getattr(p, "notes", []))))
        rewrite = next(p for p in passes if isinstance(p, ReversibleRewrite))
        for chain, name in zip(finder.chains, rewrite.chain_names):
            side = []
            for b in chain.blocks:
                side += [s.name for s in b.side_inputs if s.name not in side]
            report.chains.append(ChainReport(
                name=name, first_module=chain.first_module, last_module=chain.last_module,
                depth=len(chain.blocks), width=chain.width, groups=self.config.groups,
                side_inputs=side, stored_bytes_plain=chain.stored_bytes_plain(),
                stored_bytes_reversible=chain.stored_bytes_reversible(),
                coupling=chain.coupling, coupling_reason=chain.reason,
            ))
        report.not_converted = list(finder.rejected)
        if not finder.chains and not finder.rejected:
            report.not_converted.append(
                ("model", "no residual addition h + f(h) with a branch f of the same width was found")
            )
        report.params_before = _count_parameters(self._source_model)
        report.params_after = _count_parameters(gm)
        return report

    # -- inspection --------------------------------------------------------------------

    @property
    def _source_model(self) -> nn.Module:
        return self._modules["source"] if "source" in self._modules else self.__dict__["_source"]

    @property
    def is_compiled(self) -> bool:
        return self.compiled is not None

    @property
    def graph_module(self) -> fx.GraphModule:
        """The rewritten torch.fx GraphModule last run (or for the current mode)."""
        if not self._graphs:
            raise GSRCompileError(
                "not compiled yet: call the model once, or pass example_inputs= to gsr_compile"
            )
        for key in (self._last_key, *self._graphs):
            if key in self._graphs and key[0] == self.training:
                return self._graphs[key]
        return self._graphs[self._last_key]

    @property
    def report(self) -> CompileReport:
        """The structured form of ``explain()`` for the graph last run."""
        self.graph_module  # raises when not compiled
        key = next(k for k, g in self._graphs.items() if g is self.graph_module)
        return self._reports[key]

    @property
    def liveness(self) -> ActivationLiveness:
        """The live intervals of one step of the graph last run."""
        self.graph_module  # raises when not compiled
        key = next(k for k, g in self._graphs.items() if g is self.graph_module)
        live = self.__dict__.get("_liveness", {}).get(key)
        if live is None:
            raise GSRCompileError("this model was compiled by a version without memory planning; "
                                  "compile it again to get its liveness")
        return live

    def memory_plan(self, num_nodes: int | None = None, num_edges: int | None = None) -> ArenaPlan:
        """One step's activations planned in one arena for ``num_nodes`` nodes and
        ``num_edges`` edges (default: the traced inputs), without running anything."""
        return self.liveness.plan(num_nodes, num_edges)

    def predict_peak(self, num_nodes: int | None = None, num_edges: int | None = None, *,
                     optimizer: str = "adam", device: str | None = None) -> "StepPeak":
        """The predicted peak of one training step at ``num_nodes`` nodes and ``num_edges``
        edges (default: the traced inputs), without running anything: parameters, gradients,
        optimizer state, inputs, the arena and the activations' high point
        (:mod:`gsr_compiler.peak`). ``device`` defaults to the parameters' device."""
        return self._peak_predictor().predict(num_nodes, num_edges, optimizer,
                                              device or self._device())

    def max_nodes(self, budget: int | str, avg_degree: float | None = None, *,
                  optimizer: str = "adam", device: str | None = None) -> int:
        """The largest graph (or batch) whose training step is predicted to fit ``budget``
        (bytes, or a string such as ``"6GiB"``), with ``avg_degree`` edges per node (default:
        the traced graph's); 0 when not even one node fits."""
        from .budget import parse_budget

        nbytes = parse_budget(budget, "budget")
        return self._peak_predictor().max_nodes(nbytes, avg_degree, optimizer,
                                                device or self._device())

    def _peak_predictor(self) -> "PeakPredictor":
        from .peak import PeakPredictor

        self.graph_module  # raises when not compiled
        key = next((k for k in (self._last_key, *self._graphs) if k in self._graphs and k[0]
                    and k in self.__dict__.get("_liveness", {})), None)
        if key is None:
            raise GSRCompileError("the step peak is that of a training step: compile in train() "
                                  "mode (only graphs traced for eval exist)")
        return PeakPredictor(self._liveness[key], self._graphs[key], self)

    def _device(self) -> str:
        return str(next((p.device for p in self.parameters()), torch.device("cpu")))

    @property
    def coupling_arena(self) -> CouplingArena | None:
        """The arena the chains run their coupling in (None with ``plan_memory=False``)."""
        return self.__dict__.get("_coupling_arena")

    def explain(self) -> str:
        """What was rewritten, what was not and why, parameter counts, expected savings."""
        if not self._graphs:
            return (f"gsr_compile({type(self._source_model).__name__}): not compiled yet; it traces "
                    "on the first call, or pass example_inputs= to gsr_compile.")
        report = self.report
        if report.precision is not None and report.chains:
            report.precision.last_step = self.precision_report()
        choice = self.__dict__.get("_budget_choice")
        return str(report) + ("\n" + "\n".join(choice.lines()) if choice else "")

    def verify_gradients(self, inputs, loss_fn=None, *, kwargs: dict | None = None,
                         tolerance: float | None = None, against: str = "reference"):
        """Runs one step of the compiled model and of its store-everything reference (the same
        architecture keeping every activation, same weights and random numbers) and compares
        every gradient: a :class:`~gsr_compiler.reference.GradientCheck` (print it for a
        table). Changes nothing: no ``.grad``, no BatchNorm statistics, no random state.

        Args:
            inputs: the model's positional arguments (a tuple, or one tensor).
            loss_fn: model output -> scalar loss; default a fixed random weighting of it.
            kwargs: keyword arguments of the model's forward.
            tolerance: relative error ``GradientCheck.ok`` allows (default
                ``GSRConfig.drift_tolerance``).
            against: ``"reference"`` (the store-everything run in the model's dtype) or
                ``"float64"`` (the same run in float64; a gradient passes when it is as close to
                it as the model's own dtype lets storing everything be, see
                :mod:`gsr_compiler.reference`).
        """
        from .reference import verify_gradients

        args = inputs if isinstance(inputs, tuple) else (inputs,)
        gm, values = self._graph_for(args, kwargs or {})
        tol = self.config.drift_tolerance if tolerance is None else tolerance
        return verify_gradients(gm, values, loss_fn, tol, against)

    def precision_report(self) -> str:
        """What each reversible chain's last backward kept for exactness and measured: replayed
        choices, anchors, bytes, the reconstruction error at anchors and at the chain input."""
        self.graph_module  # raises when not compiled
        lines = []
        for gm in self._graphs.values():
            for m in gm.modules():
                if isinstance(m, ReversibleChain):
                    name = getattr(m, "gsr_name", "chain")
                    if any(line.startswith(f"{name}:") for line in lines):
                        continue
                    p = m.last_precision
                    lines.append(f"{name}: " + ("no backward yet" if p is None else p.summary()))
        return "\n".join(lines) or "no reversible chain"

    def save_graph(self, path: str) -> str:
        """Writes a picture of the rewritten graph (SVG/PNG); returns the path written."""
        from .drawing import save_graph

        return save_graph(self.graph_module, path)

    # -- nn.Module behaviour -----------------------------------------------------------

    def named_parameters(self, *args, **kwargs) -> Iterator[tuple[str, nn.Parameter]]:
        if self.compiled is None:
            raise GSRCompileError(
                "gsr_compile rewrites the model on its first call, which creates new parameters; "
                "create the optimizer after calling the model once, or pass example_inputs= to "
                "gsr_compile so it compiles right away."
            )
        return super().named_parameters(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.compiled is None and any(k.startswith("compiled.") for k in state_dict):
            raise GSRCompileError(
                "this state_dict belongs to a compiled model; compile first (call the model once "
                "or pass example_inputs= to gsr_compile), then load it."
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        source = self.__dict__.get("_source")
        if source is not None:  # keep the original in step: it is retraced for other modes
            source._apply(fn, recurse)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        source = self.__dict__.get("_source")
        if source is not None:
            source.train(mode)
        return self


def _checkpoint_lines(findings: TraceFindings, restore: RestoreCheckpoints) -> list[str]:
    """What became of each ``torch.utils.checkpoint`` call of the model, for ``explain()``."""
    lines = []
    for record in findings.checkpoints:
        at = f" at {record.where}" if record.where else ""
        if not record.module:
            lines.append(f"checkpoint of function {record.type_name}{at}: traced through and "
                         f"NOT kept ({record.not_kept or 'inside another checkpoint'})")
        elif record in restore.kept:
            lines.append(f"'{record.module}' ({record.type_name}): kept checkpointed{at}")
        else:
            lines.append(f"'{record.module}' ({record.type_name}): checkpointed as written, now "
                         f"part of a reversible chain (no checkpoint needed){at}")
    return lines


@contextlib.contextmanager
def _reversible_modules_kept_inputs(gm: fx.GraphModule) -> Iterator[None]:
    """PyG's invertible modules free their input's storage on every call; the passes run
    the graph on the caller's tensors, so run them plainly (``disable``: same outputs)."""
    modules = [m for m in gm.modules() if isinstance(m, _ALREADY_REVERSIBLE) and not m.disable]
    for m in modules:
        m.disable = True
    try:
        yield
    finally:
        for m in modules:
            m.disable = False


def _cpu_topk(gm: fx.GraphModule) -> str | None:
    """How the group top-k layers of ``gm`` select on CPU, or None where it has none."""
    if not any(isinstance(m, (GroupTopK, GroupTopKCompress)) for m in gm.modules()):
        return None
    status = native_topk_status()
    if native_topk_available():
        return f"native selection ({status})"
    return f"torch.topk ({status})"


def _choose_backend(backend: str, values: list, model: nn.Module) -> BackendChoice:
    """``GSRConfig.backend`` resolved for the call's tensors (else the model's parameters);
    raises before anything is traced when ``"triton"`` cannot run on them."""
    devices = {v.device for v in _tensors(values)}
    if not devices:
        devices = {p.device for p in model.parameters()}
    try:
        return choose_backend(backend, devices)
    except ValueError as e:
        raise GSRCompileError(str(e)) from None


def _tensors(values) -> Iterator[torch.Tensor]:
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)
        elif isinstance(v, dict):
            yield from _tensors(list(v.values()))


def _memory_report(planner: PlanActivationMemory, plan_memory: bool) -> MemoryPlanReport:
    live, plan, placed = planner.liveness, planner.plan, planner.placed_plan
    return MemoryPlanReport(
        training=live.training, num_nodes=live.num_nodes, num_edges=live.num_edges,
        intervals=len(plan), planned_bytes=plan.total_bytes, lower_bound=plan.lower_bound,
        arena_buffers=len(placed), arena_bytes=placed.total_bytes,
        arena_lower_bound=placed.lower_bound, plan_memory=plan_memory, notes=list(live.notes))


def _run_passes(passes: list, gm: fx.GraphModule) -> None:
    """Runs the passes with torch.fx's PassManager, surfacing our own errors as they are."""
    try:
        PassManager(passes=passes, run_checks_after_each_pass=True)(gm)
    except Exception as e:
        cause = e.__cause__ or e
        if isinstance(cause, GSRCompileError):  # drop PassManager's wrapper, keep its own cause
            raise cause from cause.__cause__
        raise GSRCompileError(f"{e}: {type(cause).__name__}: {cause}") from cause


def _whose_failure(model: nn.Module, error: LayerFailedError, args: tuple, kwargs: dict,
                   mode: bool) -> GSRCompileError:
    """``error`` led by whether the model itself fails on these inputs, found by running it
    once as written (state restored), so that its own bugs are not blamed on gsr_compile."""
    name = type(model).__name__
    was_training = model.training
    model.train(mode)
    eager = None
    try:
        with state_preserved(model, list(_tensors([args, kwargs]))):
            model(*args, **kwargs)
    except Exception as e:
        eager = e
    finally:
        model.train(was_training)
    if eager is None:
        return GSRCompileError(
            f"gsr_compile could not run {name}, which runs on these inputs without it: {error}"
            "\n  this is a bug in gsr_compile; please report it with the model and input shapes")
    cause = error.__cause__
    same = type(eager) is type(cause) and str(eager) == str(cause)
    return GSRCompileError(
        f"{name} fails on these inputs even without gsr_compile: {error}"
        + ("" if same else f"\n  run as written it raises {type(eager).__name__}: {eager}"))


def _bind(model: nn.Module, args: tuple, kwargs: dict) -> list:
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return list(bound.arguments.values())


def gsr_compile(model: nn.Module, config: GSRConfig | None = None, *,
                example_inputs: tuple | None = None, example_kwargs: dict | None = None,
                **options) -> GSRModule:
    """Compiles a deep residual GNN into GSR (grouped reversible) form.

    Like ``torch.compile`` it traces lazily on the first call with the real inputs, or
    right away when ``example_inputs`` is given (then the optimizer can be created
    before the first call). Options are the fields of :class:`GSRConfig`, e.g.
    ``gsr_compile(model, groups=4, strict=True)``.

    The user's model is not modified; modules outside the converted chains are shared.
    """
    cfg = GSRConfig.from_options(config, **options)
    if cfg.memory_budget is not None:
        from .budget import compile_within_budget

        return compile_within_budget(model, cfg, example_inputs, example_kwargs)
    return GSRModule(model, cfg, example_inputs=example_inputs, example_kwargs=example_kwargs)
