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
