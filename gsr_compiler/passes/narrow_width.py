"""Width rules: build a fresh copy of a module at 1/G of its channel width.

Grouped reversible coupling runs G copies of a residual branch ``f``, each on D/G
channels. Every channel dimension inside the branch (input, hidden and output widths)
is divided by G; attention heads, aggregation choices, eps, dropout rates and other
hyper-parameters are kept. The copies are freshly initialized: the rewrite changes the
function, it does not reshape trained weights.

Each rule is ``rule(module, groups) -> nn.Module``. A module type without a rule makes
its block unconvertible, with the reason reported by ``explain()``. Rules match the exact
class (``type(module)``), never its name or a subclass: a user's own ``class GENConv`` or a
subclass with its own ``forward`` may compute something the rule does not know.

Edge features are not node features: they come from outside the branch at their own
width ``[E, edge_dim]`` and are not split into groups. A layer that reads them
(``GINEConv``, ``GATConv``/``GATv2Conv`` with ``edge_dim``, ``GENConv``; the table
``EDGE_FEATURE_ARGUMENT`` in ``layer_types.py``) gets, in each group's copy, its own
projection from the full edge width to the group's width, as the authors of RevGNN give
each group of their grouped GENConv its own edge encoder. ``narrow_module`` is told the
edge width the layer is called with (``edge_width``) so that the copy projects exactly what
it will receive.
"""
from __future__ import annotations

import copy
from typing import Callable

from torch import nn

from .layer_types import EDGE_FEATURE_ARGUMENT, qualified_name

NarrowRule = Callable[[nn.Module, int], nn.Module]


class NarrowingError(ValueError):
    """A module cannot be narrowed to 1/G of its width; the message says why."""


def _div(value: int, groups: int, what: str) -> int:
    if value == -1:  # lazily initialized PyG layers keep inferring their input width
        return -1
    if value % groups:
        raise NarrowingError(f"{what}={value} is not divisible by groups={groups}")
    return value // groups


def _div_channels(value, groups: int, what: str):
    if isinstance(value, (tuple, list)):
        return tuple(_div(v, groups, what) for v in value)
    return _div(value, groups, what)


def _like(new: nn.Module, old: nn.Module) -> nn.Module:
    """Moves ``new`` to the device and floating dtype of ``old``."""
    for t in list(old.parameters()) + list(old.buffers()):
        if t.is_floating_point():
            return new.to(device=t.device, dtype=t.dtype)
    for t in list(old.parameters()) + list(old.buffers()):
        return new.to(device=t.device)
    return new


def _has_own_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(
        True for _ in module.buffers(recurse=False)
    )


# --- torch.nn -----------------------------------------------------------------------

def _linear(m: nn.Linear, g: int) -> nn.Module:
    return nn.Linear(
        _div(m.in_features, g, "in_features"),
        _div(m.out_features, g, "out_features"),
        bias=m.bias is not None,
    )


def _layer_norm(m: nn.LayerNorm, g: int) -> nn.Module:
    if len(m.normalized_shape) != 1:
        raise NarrowingError(
            f"LayerNorm over {tuple(m.normalized_shape)}: only normalization over the last "
            "(channel) dimension can be split into groups"
        )
    return nn.LayerNorm(
        _div(m.normalized_shape[0], g, "normalized_shape"),
        eps=m.eps,
        elementwise_affine=m.elementwise_affine,
        bias=m.bias is not None,
    )


def _batch_norm(m: nn.BatchNorm1d, g: int) -> nn.Module:
    return type(m)(
        _div(m.num_features, g, "num_features"),
        eps=m.eps,
        momentum=m.momentum,
        affine=m.affine,
        track_running_stats=m.track_running_stats,
    )


def _stateless(m: nn.Module, g: int) -> nn.Module:
    if _has_own_state(m) or any(True for _ in m.children()):
        raise NarrowingError(f"{type(m).__name__} holds parameters or submodules")
    return copy.deepcopy(m)


def _scalar_state(m: nn.Module, g: int) -> nn.Module:
    """Aggregations and message norms whose parameters are scalars (softmax temperature,
    power, scale): a fresh copy works at any width."""
    for name, t in list(m.named_parameters()) + list(m.named_buffers()):
        if t.numel() > 1:
            raise NarrowingError(
                f"{type(m).__name__} holds '{name}' of shape {tuple(t.shape)}; no width rule is known for it"
            )
    new = copy.deepcopy(m)
    if hasattr(new, "reset_parameters"):
        new.reset_parameters()
    return new


def _prelu(m: nn.PReLU, g: int) -> nn.Module:
    n = m.num_parameters
    return nn.PReLU(n if n == 1 else _div(n, g, "num_parameters"), init=0.25)


def _container(m: nn.Module, g: int, replace: dict[str, nn.Module] | None = None) -> nn.Module:
    """Sequential / ModuleList / composite modules whose own state is channel-free:
    narrow each child, and divide the ``*_channels`` attributes that forward may read.
    Children named in ``replace`` are set to the given modules instead (added if absent)."""
    replace = dict(replace or {})
    for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
        if t.numel() > 1:
            raise NarrowingError(
                f"{type(m).__name__} holds tensor '{name}' of shape {tuple(t.shape)} directly; "
                "no width rule is known for it"
            )
    new = copy.copy(m)
    new._parameters = {k: None if v is None else nn.Parameter(v.detach().clone(), v.requires_grad)
                       for k, v in m._parameters.items()}
    new._buffers = {k: None if v is None else v.detach().clone() for k, v in m._buffers.items()}
    new._modules = {}
    for k, v in m._modules.items():
        if k in replace:
            new._modules[k] = replace.pop(k)
            continue
        try:
            new._modules[k] = None if v is None else narrow_module(v, g)
        except NarrowingError as e:
            raise NarrowingError(f"{type(m).__name__}.{k}: {e}") from None
    new._modules.update(replace)
    for attr in ("in_channels", "out_channels", "hidden_channels"):
        value = getattr(m, attr, None)
        if isinstance(value, (int, tuple)) and not isinstance(value, bool) and attr in m.__dict__:
            new.__dict__[attr] = _div_channels(value, g, attr)
    if isinstance(getattr(m, "channel_list", None), list):  # PyG MLP
        new.__dict__["channel_list"] = [_div(c, g, "channel_list") for c in m.channel_list]
    if hasattr(new, "reset_parameters"):
        new.reset_parameters()
    return new


# --- PyG ----------------------------------------------------------------------------

#: ``rule(module, groups, edge_width) -> nn.Module`` for the layers of ``EDGE_FEATURE_ARGUMENT``.
EdgeNarrowRule = Callable[[nn.Module, int, "int | None"], nn.Module]
EDGE_WIDTH_RULES: dict[type, EdgeNarrowRule] = {}


def _pyg_rules() -> dict[type, NarrowRule]:
    try:
        import torch_geometric.nn as pyg
        from torch_geometric.nn.aggr import Aggregation
        from torch_geometric.nn.dense.linear import Linear as PyGLinear
        from torch_geometric.nn.norm import BatchNorm, GraphNorm, LayerNorm
    except ImportError:  # pragma: no cover
        return {}

    def aggr_of(m) -> object:
        if isinstance(m.aggr, str):
            return m.aggr
        if isinstance(m.aggr_module, Aggregation) and not any(
            p.numel() > 1 for p in m.aggr_module.parameters()
        ):
            return copy.deepcopy(m.aggr_module)
        raise NarrowingError(f"aggregation {m.aggr_module} holds channel-wide parameters")

    def linear(m, g):
        return PyGLinear(
            _div(m.in_channels, g, "in_channels"), _div(m.out_channels, g, "out_channels"),
            bias=m.bias is not None, weight_initializer=m.weight_initializer,
            bias_initializer=m.bias_initializer,
        )

    def layer_norm(m, g):
        return LayerNorm(_div(m.in_channels, g, "in_channels"), eps=m.eps, affine=m.affine, mode=m.mode)

    def batch_norm(m, g):
        bn = m.module
        return BatchNorm(
            _div(m.in_channels, g, "in_channels"), eps=bn.eps, momentum=bn.momentum,
            affine=bn.affine, track_running_stats=bn.track_running_stats,
            allow_single_element=m.allow_single_element,
        )

    def graph_norm(m, g):
        return GraphNorm(_div(m.in_channels, g, "in_channels"), eps=m.eps)

    def gcn(m, g):
        if m.aggr != "add":
            raise NarrowingError(f"GCNConv with aggr={m.aggr!r}")
        return pyg.GCNConv(
            _div(m.in_channels, g, "in_channels"), _div(m.out_channels, g, "out_channels"),
            improved=m.improved, cached=m.cached, add_self_loops=m.add_self_loops,
            normalize=m.normalize, bias=m.bias is not None, flow=m.flow,
        )

    def sage(m, g):
        return pyg.SAGEConv(
            _div_channels(m.in_channels, g, "in_channels"), _div(m.out_channels, g, "out_channels"),
            aggr=aggr_of(m), normalize=m.normalize, root_weight=m.root_weight,
            project=m.project, bias=m.lin_l.bias is not None, flow=m.flow,
        )

    def graph_conv(m, g):
        return pyg.GraphConv(
            _div_channels(m.in_channels, g, "in_channels"), _div(m.out_channels, g, "out_channels"),
            aggr=aggr_of(m), bias=m.lin_rel.bias is not None, flow=m.flow,
        )

    def gin(m, g):
        return pyg.GINConv(
            narrow_module(m.nn, g), eps=m.initial_eps,
            train_eps=isinstance(m.eps, nn.Parameter), flow=m.flow,
        )

    def gine(m, g, edge_width):
        # GINE adds the edge features to x_j. With edge_dim they pass through m.lin first;
        # without it they must have the node width D. Either way the narrow copy projects
        # the full edge features to D/G (its own lin).
        if m.lin is not None:
            edge_dim = m.lin.in_channels
        elif edge_width is not None:
            edge_dim = edge_width
        else:
            edge_dim = _nn_input_width(m.nn)
            if edge_dim is None:
                raise NarrowingError("GINEConv without edge_dim and with an nn of unknown input width")
        return pyg.GINEConv(
            narrow_module(m.nn, g), eps=m.initial_eps,
            train_eps=isinstance(m.eps, nn.Parameter), edge_dim=edge_dim, flow=m.flow,
        )

    def gat_out(m, g):
        if m.concat:
            if m.out_channels % g == 0:
                return m.heads, m.out_channels // g
            if m.heads % g == 0:
                return m.heads // g, m.out_channels
            raise NarrowingError(
                f"{type(m).__name__}(heads={m.heads}, out_channels={m.out_channels}): neither "
                f"is divisible by groups={g}"
            )
        return m.heads, _div(m.out_channels, g, "out_channels")

    def gat(m, g, edge_width):
        # With edge_dim, lin_edge maps the full edge features to the copy's heads x width;
        # without it GAT ignores edge features, narrowed or not.
        if m.edge_dim is not None and edge_width is not None and edge_width != m.edge_dim:
            raise NarrowingError(f"{type(m).__name__}(edge_dim={m.edge_dim}) is called with "
                                 f"edge features of width {edge_width}")
        heads, out = gat_out(m, g)
        extra = {"share_weights": m.share_weights} if isinstance(m, pyg.GATv2Conv) else {}
        return type(m)(
            _div_channels(m.in_channels, g, "in_channels"), out, heads=heads, concat=m.concat,
            negative_slope=m.negative_slope, dropout=m.dropout, add_self_loops=m.add_self_loops,
            edge_dim=m.edge_dim, fill_value=m.fill_value, bias=m.bias is not None,
            residual=m.residual, flow=m.flow, **extra,
        )

    def gen(m, g, edge_width):
        # GENConv adds edge features to x_j after its own lin_edge (edge_dim != out_channels)
        # or as they are (then of width out_channels). Each group's copy gets its own
        # lin_edge from the full edge width to out_channels/G, also where the original had
        # none; the rest (MLP, aggregation, message norm, lin_src/lin_dst) is narrowed.
        out = _div(m.out_channels, g, "out_channels")
        lin_edge = getattr(m, "lin_edge", None)
        edge_in = lin_edge.in_channels if lin_edge is not None else edge_width
        if edge_width is not None and edge_width != edge_in:
            raise NarrowingError(
                f"GENConv with lin_edge of in_channels={edge_in} is called with edge features "
                f"of width {edge_width}")
        if edge_in is None:
            return _container(m, g)
        if lin_edge is not None:
            bias = lin_edge.bias is not None
        else:  # GENConv's one `bias` flag is shared by all its linear maps
            bias = any(isinstance(x, PyGLinear) and x.bias is not None for x in m.modules())
        return _container(m, g, {"lin_edge": PyGLinear(edge_in, out, bias=bias)})

    edge_rules = {pyg.GINEConv: gine, pyg.GATConv: gat, pyg.GATv2Conv: gat, pyg.GENConv: gen}
    if set(edge_rules) != set(EDGE_FEATURE_ARGUMENT):  # two tables that must agree
        raise RuntimeError("layer_types.EDGE_FEATURE_ARGUMENT and the edge width rules differ")
    EDGE_WIDTH_RULES.update(edge_rules)

    return {
        PyGLinear: linear,
        LayerNorm: layer_norm,
        BatchNorm: batch_norm,
        GraphNorm: graph_norm,
        pyg.GCNConv: gcn,
        pyg.SAGEConv: sage,
        pyg.GraphConv: graph_conv,
        pyg.GINConv: gin,
        pyg.MLP: _container,
        # Rules that also take the width of the edge features the layer is called with.
        **{t: (lambda r: lambda m, g: r(m, g, None))(r) for t, r in edge_rules.items()},
    }


def _nn_input_width(m: nn.Module) -> int | None:
    for sub in m.modules():
        if isinstance(sub, nn.Linear):
            return sub.in_features
        if hasattr(sub, "in_channels") and isinstance(sub.in_channels, int) and sub.in_channels > 0:
            return sub.in_channels
    return None


_STATELESS_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Dropout, nn.AlphaDropout, nn.Identity,
)

WIDTH_RULES: dict[type, NarrowRule] = {
    nn.Linear: _linear,
    nn.LayerNorm: _layer_norm,
    nn.BatchNorm1d: _batch_norm,
    nn.PReLU: _prelu,
    nn.Sequential: _container,
    nn.ModuleList: _container,
    **{t: _stateless for t in _STATELESS_MODULES},
    **_pyg_rules(),
}


def _scalar_state_bases() -> tuple[type, ...]:
    try:
        from torch_geometric.nn.aggr import Aggregation
        from torch_geometric.nn.norm import MessageNorm
    except ImportError:  # pragma: no cover
        return ()
    return (Aggregation, MessageNorm)


_SCALAR_STATE_BASES = _scalar_state_bases()


def supported_module_names() -> list[str]:
    """Names of the module types the width rewrite supports."""
    return sorted({t.__name__ for t in WIDTH_RULES} | {f"{t.__name__} (scalar parameters)"
                                                      for t in _SCALAR_STATE_BASES})


def _no_rule_message(cls: type) -> str:
    """Why ``cls`` has no width rule, naming it by module path, and telling apart a class
    that only shares a supported class's name, or derives from one."""
    message = f"no width rule for {qualified_name(cls)}"
    namesakes = [t for t in WIDTH_RULES if t.__name__ == cls.__name__ and t is not cls]
    bases = [t for t in WIDTH_RULES if t is not cls and issubclass(cls, t)
             and t not in (nn.Sequential, nn.ModuleList)]
    if namesakes:
        message += (f" (width rules match the exact class; the supported {cls.__name__} is "
                    f"{qualified_name(namesakes[0])}, a different class)")
    elif bases:
        message += (f" (a subclass of {qualified_name(bases[0])}; width rules match the exact "
                    "class, since a subclass may change what forward computes)")
    return message


def narrow_module(module: nn.Module, groups: int, *, edge_width: int | None = None) -> nn.Module:
    """A fresh copy of ``module`` at 1/``groups`` of its channel width.

    ``edge_width``: the width of the edge features the layer is called with (``[E,
    edge_width]``), ``None`` if it reads none. Only the layers of
    ``layer_types.EDGE_FEATURE_ARGUMENT`` accept edge features.

    Raises :class:`NarrowingError` naming the module's class (with its module path) when
    no rule applies.
    """
    cls = type(module)
    edge_rule = EDGE_WIDTH_RULES.get(cls)
    if edge_rule is not None:
        new = edge_rule(module, groups, edge_width)
        new.train(module.training)
        return _like(new, module)
    if edge_width is not None:
        raise NarrowingError(
            f"{qualified_name(cls)} is called with edge features; only "
            f"{', '.join(sorted(t.__name__ for t in EDGE_WIDTH_RULES))} split them into groups")
    rule = WIDTH_RULES.get(cls)
    if rule is None and isinstance(module, _SCALAR_STATE_BASES):
        rule = _scalar_state
    if rule is None and isinstance(module, (nn.Sequential, nn.ModuleList)):
        rule = _container
    if rule is None:
        raise NarrowingError(_no_rule_message(cls))
    new = rule(module, groups)
    new.train(module.training)
    return _like(new, module)


__all__ = ["NarrowingError", "narrow_module", "supported_module_names", "WIDTH_RULES",
           "EDGE_WIDTH_RULES"]
