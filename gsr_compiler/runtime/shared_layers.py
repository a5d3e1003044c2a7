"""State-dict hooks for runtime modules that call the user's own layers.

A two-stream chain or a recomputed block runs layers that stay registered in the user's model
under their own names: the same tensors are reachable under two keys. The module lists them
under the user's keys only (:func:`register_alias_hooks`), and does not report its own names
for them as missing when a state_dict is loaded. The module says which keys are aliases through
``alias_keys()``: ``(key under the module, key under the model holding it)``.

The hooks are module-level functions, so they pickle with the module.
"""
from __future__ import annotations

from torch import nn

__all__ = ["register_alias_hooks", "alias_pairs"]


def alias_pairs(branch: nn.Module, prefix: str, shared: dict[str, str]) -> list[tuple[str, str]]:
    """``(prefix + local key, model key)`` for every parameter and buffer of the layers of
    ``branch`` named in ``shared`` (``{name in branch: path in the model}``)."""
    pairs = []
    for local, path in shared.items():
        module = getattr(branch, local, None)
        if module is None:
            continue
        for key in module.state_dict(keep_vars=True):
            pairs.append((f"{prefix}{local}.{key}", f"{path}.{key}"))
    return pairs


def register_alias_hooks(module: nn.Module) -> None:
    """Installs the hooks on ``module``, which must define ``alias_keys()``."""
    module._register_state_dict_hook(drop_aliases)
    module.register_load_state_dict_pre_hook(note_prefix)
    module.register_load_state_dict_post_hook(aliases_are_not_missing)


def drop_aliases(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """The shared tensors are listed under the user's keys only."""
    for mine, _ in module.alias_keys():
        state_dict.pop(prefix + mine, None)


def note_prefix(module: nn.Module, state_dict, prefix: str, *args) -> None:
    module.__dict__["_load_prefix"] = prefix


def aliases_are_not_missing(module: nn.Module, incompatible_keys) -> None:
    """The module's names of shared tensors are not missing: the tensors are the user's, loaded
    (or reported missing) under the user's keys."""
    prefix = module.__dict__.pop("_load_prefix", "")
    mine = {prefix + key for key, _ in module.alias_keys()}
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys
                                         if k not in mine]
