"""Pass: warn at compile time about reversible chains whose backward cannot stay exact.

Two things make a chain's rebuilt inputs drift further than replay and anchors can bound:

* **A row-wise norm over very few channels.** Narrowing divides every width by ``groups``; a
  LayerNorm left with 2 channels per row maps every row to about ``(+1, -1)`` or ``(-1, +1)``,
  a discrete choice hidden in a smooth op, and one with 4 is ill-conditioned. Measured here
  (float32, pre-norm SAGE, 2,000 nodes, replay on; first-block gradient error against the
  store-everything reference): 2 channels 7e-4 at 8 blocks and 0.14 at 64; 4 channels 5e-6 and
  4e-5; 8 or more at most 2e-6 at 64 blocks. Below :data:`MIN_NORM_CHANNELS` it warns.
* **A 16-bit chain.** float16 and bfloat16 round at 1e-3 and 8e-3: the rebuilt inputs lose most of
  their bits within a few blocks. Keep the chain in float32. (Under ``torch.autocast`` the chain
  keeps its state in float32 by itself and runs only the branches in 16 bits: no warning.)

Findings go to ``node.meta["gsr_precision"]`` of the chain's node, to ``notes`` (``explain()``)
and, once per message, to a :class:`~gsr_compiler.errors.GSRPrecisionWarning`.
"""
from __future__ import annotations

import warnings

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..errors import GSRPrecisionWarning
from ..runtime.reversible import ReversibleChain
from .chain_nodes import chain_nodes

__all__ = ["CheckChainPrecision", "MIN_NORM_CHANNELS", "row_norm_width"]

#: Fewest channels a row-wise norm inside a reversible branch may normalize without a warning.
MIN_NORM_CHANNELS = 8

_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def row_norm_width(module: nn.Module) -> int | None:
    """Channels a row-wise norm (LayerNorm, PyG LayerNorm in node mode, RMSNorm) normalizes
    together, or None for anything else."""
    if isinstance(module, nn.LayerNorm) or type(module).__name__ == "LayerNormGroupTopKCompress":
        return int(module.normalized_shape[-1])
    if isinstance(module, getattr(nn, "RMSNorm", ())) and module.normalized_shape:
        return int(module.normalized_shape[-1])
    if type(module).__module__.startswith("torch_geometric.nn.norm") \
            and type(module).__name__ == "LayerNorm" and getattr(module, "mode", "") == "node":
        return int(module.in_channels)
    return None


class CheckChainPrecision(PassBase):
    """Records (and warns about) narrow row-wise norms and 16-bit chains."""

    def __init__(self) -> None:
        super().__init__()
        self.notes: list[str] = []

    def call(self, gm: fx.GraphModule) -> PassResult:
        for node, chain in chain_nodes(gm):
            found = _findings(str(node.target), node, chain)
            node.meta["gsr_precision"] = found
            for message in found:
                self.notes.append(message)
                warnings.warn(message, GSRPrecisionWarning, stacklevel=2)
        return PassResult(gm, False)


def _findings(name: str, node: fx.Node, chain: ReversibleChain) -> list[str]:
    found = []
    narrow = sorted({w for block in chain.blocks for f in block for m in f.modules()
                     if (w := row_norm_width(m)) is not None and w < MIN_NORM_CHANNELS})
    if narrow:
        found.append(
            f"{name}: a row-wise norm in its branches normalizes only {narrow[0]} channel(s) "
            f"after splitting into {chain.groups} groups (fewer than {MIN_NORM_CHANNELS}): it is "
            "ill-conditioned and the reversible backward's gradients drift (docs/exactness.md). "
            "Use fewer groups or a wider model.")
    meta = node.args[0].meta.get("tensor_meta") if node.args and isinstance(node.args[0], fx.Node) \
        else None
    dtype = getattr(meta, "dtype", None)
    # Traced under autocast: the chain keeps its state in float32 at run time (16-bit branches).
    under_autocast = any(torch.is_autocast_enabled(t) for t in ("cpu", "cuda"))
    if dtype in _SIXTEEN_BIT and not under_autocast:
        found.append(
            f"{name}: the chain runs in {dtype}; rebuilding block inputs in 16-bit arithmetic "
            "loses most of their bits within a few blocks, so its gradients drift. Keep the "
            "chain's state in float32 (model.float()).")
    return found
