"""Group-wise sparse nonlinearity (the "S" of GSR) and the ops that consume its compressed form.

* :func:`group_topk` / :class:`GroupTopK`: keep the k largest values per node and channel group
  (dense in, dense out; autograd keeps only uint8 positions).
* :func:`group_topk_compress` -> :class:`CompressedActivation`: the same, in compressed form.
* :func:`compressed_linear`, :func:`compressed_aggregate`: the next op, reading the compressed form.
* :func:`layer_norm_group_topk_compress`: a LayerNorm and the top-k in one op, in row blocks.
* Module forms the compiler inserts: :class:`GroupTopKCompress` (:class:`LayerNormGroupTopKCompress`
  where a LayerNorm precedes it), :class:`CompressedDropout`,
  :class:`CompressedLinear`, and the message-passing layers :class:`CompressedGCNConv`,
  :class:`CompressedSAGEConv`, :class:`CompressedGraphConv`, :class:`CompressedGINConv`.

Runtime code only: the compiler pass that inserts these lives in ``gsr_compiler.passes``.
"""
from .compressed import (CompressedActivation, compressed_nbytes_per_row, compression_ratio,
                         index_dtype_for_group)
from .aggregate import compressed_aggregate
from .linear import compressed_linear
from .topk import GroupTopK, group_topk, group_topk_compress, select_group_topk
from .modules import CompressedDropout, CompressedLinear, GroupTopKCompress
from .norm_topk import LayerNormGroupTopKCompress, layer_norm_group_topk_compress
from .conv import CompressedGCNConv, CompressedGINConv, CompressedGraphConv, CompressedSAGEConv

__all__ = [
    "CompressedActivation",
    "CompressedDropout",
    "CompressedGCNConv",
    "CompressedGINConv",
    "CompressedGraphConv",
    "CompressedLinear",
    "CompressedSAGEConv",
    "GroupTopKCompress",
    "GroupTopK",
    "LayerNormGroupTopKCompress",
    "compressed_aggregate",
    "compressed_linear",
    "compressed_nbytes_per_row",
    "compression_ratio",
    "group_topk",
    "group_topk_compress",
    "index_dtype_for_group",
    "layer_norm_group_topk_compress",
    "select_group_topk",
]
