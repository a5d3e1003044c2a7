"""The options of :func:`gsr_compiler.gsr_compile`, gathered in one dataclass."""
from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import GSRCompileError


@dataclass(frozen=True)
class GSRConfig:
    """Options of the GSR rewrite.

    Attributes:
        groups: number of channel groups G of each reversible block (>= 2). Every
            residual block ``h + f(h)`` of width D becomes grouped additive coupling
            with G copies of ``f`` at width D/G.
        strict: raise :class:`GSRCompileError` when anything is left unconverted,
            instead of reporting it in ``explain()``.
        min_chain_blocks: shortest run of residual blocks that is made reversible.
    """

    groups: int = 2
    strict: bool = False
    min_chain_blocks: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.groups, int) or isinstance(self.groups, bool) or self.groups < 2:
            raise GSRCompileError(
                f"groups={self.groups!r}: grouped reversible coupling needs at least 2 channel "
                "groups (one group cannot be inverted from its own output). Use groups=2 or more."
            )
        if not isinstance(self.min_chain_blocks, int) or self.min_chain_blocks < 1:
            raise GSRCompileError(
                f"min_chain_blocks={self.min_chain_blocks!r}: must be a positive integer."
            )

    @classmethod
    def from_options(cls, config: "GSRConfig | None" = None, **options) -> "GSRConfig":
        """Builds a config from keyword options, naming any unknown option."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise GSRCompileError(
                f"unknown option(s) {', '.join(unknown)}; gsr_compile accepts: {', '.join(sorted(known))}."
            )
        if config is None:
            return cls(**options)
        merged = {f.name: getattr(config, f.name) for f in fields(cls)}
        merged.update(options)
        return cls(**merged)
