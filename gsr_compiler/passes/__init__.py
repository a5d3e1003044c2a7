"""Graph passes: each takes a GraphModule and rewrites or analyses it (torch.fx PassBase)."""
from .find_residual_chains import FindResidualChains, ResidualBlock, ResidualChain
from .functional_dropout_to_module import FunctionalDropoutToModule
from .group_sparse_activation import GroupSparseActivation
from .narrow_width import NarrowingError, narrow_module, supported_module_names
from .propagate_shapes import PropagateShapes
from .remove_no_ops import RemoveNoOps
from .reversible_rewrite import ReversibleRewrite

__all__ = ["FindResidualChains", "ResidualBlock", "ResidualChain", "FunctionalDropoutToModule",
           "GroupSparseActivation",
           "PropagateShapes", "RemoveNoOps", "ReversibleRewrite", "NarrowingError", "narrow_module",
           "supported_module_names"]
