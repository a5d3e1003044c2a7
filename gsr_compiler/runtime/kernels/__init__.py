"""Triton kernels of the GSR runtime, each beside the torch reference used on CPU.

=====================  ==========================================================================
``coupling``           ``coupling_add_`` / ``coupling_sub_``: reversible coupling update in place
``topk``               ``group_topk``: LayerNorm + group-wise top-k + dropout -> compressed form
``aggregate``          ``sparse_aggregate``: CSR sum over compressed embeddings, backward at kept
                       positions only
``philox``             ``philox_uniform``: ``tl.rand`` recomputed with torch (same dropout masks)
=====================  ==========================================================================

Every public op takes ``backend="auto" | "torch" | "triton"``: ``auto`` runs Triton on CUDA tensors
(when triton is importable) and the torch reference otherwise. This package imports without
triton.
"""
from ._dispatch import (BACKENDS, HAS_TRITON, BackendChoice, check_backend, choose_backend,
                        interpreting, use_triton)
from .coupling import coupling_add_, coupling_sub_, coupling_update_reference
from .aggregate import (CSR, csr_from_edge_index, sparse_aggregate,
                        sparse_aggregate_backward_reference, sparse_aggregate_reference)
from .philox import dropout_keep_mask, philox_uniform
from .topk import (KERNEL_DTYPES, MAX_GROUP_SIZE, densify_group_topk, group_topk,
                   group_topk_reference, kernel_covers_group)

__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "BackendChoice",
    "CSR",
    "KERNEL_DTYPES",
    "MAX_GROUP_SIZE",
    "kernel_covers_group",
    "check_backend",
    "choose_backend",
    "coupling_add_",
    "coupling_sub_",
    "coupling_update_reference",
    "csr_from_edge_index",
    "densify_group_topk",
    "dropout_keep_mask",
    "group_topk",
    "group_topk_reference",
    "interpreting",
    "philox_uniform",
    "sparse_aggregate",
    "sparse_aggregate_backward_reference",
    "sparse_aggregate_reference",
    "use_triton",
]
