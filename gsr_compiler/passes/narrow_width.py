"""Width rules: build a fresh copy of a module at 1/G of its channel width.

Grouped reversible coupling runs G copies of a residual branch ``f``, each on D/G
channels. Every channel dimension inside the branch (input, hidden and output widths)
is divided by G; attention heads, aggregation choices, eps, dropout rates and other
hyper-parameters are kept. The copies are freshly initialized: the rewrite changes the
function, it does not reshape trained weights.

Each rule is ``rule(module, groups) -> nn.Module``. A module type without a rule makes
its block unconvertible, with the reason reported by ``explain()``.
"""
from __future__ import annotations

import copy
from typing import Callable

from torch import nn

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


def _container(m: nn.Module, g: int) -> nn.Module:
    """Sequential / ModuleList / composite modules whose own state is channel-free:
    narrow each child, and divide the ``*_channels`` attributes that forward may read."""
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
        try:
            new._modules[k] = None if v is None else narrow_module(v, g)
        except NarrowingError as e:
            raise NarrowingError(f"{type(m).__name__}.{k}: {e}") from None
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

    def gine(m, g):
        if m.lin is not None:
            edge_dim = m.lin.in_channels
        else:
            # Without edge_dim, GINE adds edge_attr (width D) to x_j: the narrow copy
            # needs a projection D -> D/G of the edge features.
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

    def gat(m, g):
        heads, out = gat_out(m, g)
        extra = {"share_weights": m.share_weights} if isinstance(m, pyg.GATv2Conv) else {}
        return type(m)(
            _div_channels(m.in_channels, g, "in_channels"), out, heads=heads, concat=m.concat,
            negative_slope=m.negative_slope, dropout=m.dropout, add_self_loops=m.add_self_loops,
            edge_dim=m.edge_dim, fill_value=m.fill_value, bias=m.bias is not None,
            residual=m.residual, flow=m.flow, **extra,
        )

    return {
        PyGLinear: linear,
        LayerNorm: layer_norm,
        BatchNorm: batch_norm,
        GraphNorm: graph_norm,
        pyg.GCNConv: gcn,
        pyg.SAGEConv: sage,
        pyg.GraphConv: graph_conv,
        pyg.GINConv: gin,
        pyg.GINEConv: gine,
        pyg.GATConv: gat,
        pyg.GATv2Conv: gat,
        pyg.GENConv: _container,
        pyg.MLP: _container,
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


def narrow_module(module: nn.Module, groups: int) -> nn.Module:
    """A fresh copy of ``module`` at 1/``groups`` of its channel width.

    Raises :class:`NarrowingError` naming the module type and the supported list when
    no rule applies.
    """
    rule = WIDTH_RULES.get(type(module))
    if rule is None and isinstance(module, _SCALAR_STATE_BASES):
        rule = _scalar_state
    if rule is None and isinstance(module, (nn.Sequential, nn.ModuleList)):
        rule = _container
    if rule is None:
        raise NarrowingError(f"no width rule for {type(module).__name__}")
    new = rule(module, groups)
    new.train(module.training)
    return _like(new, module)


__all__ = ["NarrowingError", "narrow_module", "supported_module_names", "WIDTH_RULES"]
