"""Layer classes more than one pass recognizes, PyG's included where it is installed."""
from __future__ import annotations

from torch import nn


def _pyg_linear() -> tuple[type, ...]:
    try:
        from torch_geometric.nn.dense.linear import Linear
    except ImportError:  # pragma: no cover
        return ()
    return (Linear,)


#: ``nn.Linear`` and PyG's ``Linear`` (which may be lazy: ``in_channels=-1`` until first called).
LINEAR_TYPES: tuple[type, ...] = (nn.Linear, *_pyg_linear())


def _pyg_edge_feature_layers() -> dict[type, str]:
    try:
        import torch_geometric.nn as pyg
    except ImportError:  # pragma: no cover
        return {}
    return {pyg.GINEConv: "edge_attr", pyg.GATConv: "edge_attr", pyg.GATv2Conv: "edge_attr",
            pyg.GENConv: "edge_attr"}


#: Layers whose width rule knows how to split edge features, and the ``forward`` argument
#: that carries them. Edge features come from outside the branch at their own width
#: (``[E, edge_dim]``); every other floating feature tensor a layer reads from outside the
#: branch has no group-wise form.
EDGE_FEATURE_ARGUMENT: dict[type, str] = _pyg_edge_feature_layers()


def qualified_name(cls: type) -> str:
    """``module.path.ClassName`` of a class, as users find it in their code."""
    return f"{cls.__module__}.{cls.__qualname__}"
