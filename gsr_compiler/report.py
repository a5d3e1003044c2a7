"""What a compilation did, as printed by ``GSRModule.explain()``."""
from __future__ import annotations

from dataclasses import dataclass, field


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@dataclass
class ChainReport:
    name: str
    first_module: str
    last_module: str
    depth: int
    width: int
    groups: int
    side_inputs: list[str]
    stored_bytes_plain: int
    stored_bytes_reversible: int


@dataclass
class CompileReport:
    """The passes run, the chains converted, what was left alone and why."""

    model_name: str
    mode: str
    passes: list[tuple[str, list[str]]] = field(default_factory=list)
    chains: list[ChainReport] = field(default_factory=list)
    not_converted: list[tuple[str, str]] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    compile_seconds: float = 0.0

    @property
    def converted(self) -> bool:
        return bool(self.chains)

    def __str__(self) -> str:
        lines = [f"gsr_compile({self.model_name}) [{self.mode} mode, {self.compile_seconds:.2f} s]"]
        lines.append("passes:")
        for name, notes in self.passes:
            if len(notes) > 1:  # one line each (e.g. one per chain)
                lines += [f"  {name}:"] + [f"    {n}" for n in notes]
            else:
                lines.append(f"  {name}" + (f": {notes[0]}" if notes else ""))
        if self.chains:
            lines.append("reversible chains:")
            for c in self.chains:
                side = ", ".join(c.side_inputs) or "none"
                lines.append(
                    f"  {c.name}: {c.depth} block(s) '{c.first_module}' .. '{c.last_module}', "
                    f"width {c.width} = {c.groups} groups x {c.width // c.groups}, side inputs: {side}"
                )
            plain = sum(c.stored_bytes_plain for c in self.chains)
            rev = sum(c.stored_bytes_reversible for c in self.chains)
            lines.append(
                f"expected activations kept for backward by the chains: {format_bytes(plain)} "
                f"(eager, estimated from the traced shapes) -> {format_bytes(rev)} (reversible)"
            )
            lines.append(
                "note: grouped coupling is a different architecture than the residual chain; "
                "its branches are fresh copies at 1/groups width, so the compiled model computes "
                "a different function and must be trained (weights were not transferred)."
            )
        else:
            lines.append("no residual chain was converted; the model runs unchanged.")
        if self.not_converted:
            lines.append("not converted:")
            for where, why in self.not_converted:
                lines.append(f"  {where}: {why}")
            if any("no width rule" in why for _, why in self.not_converted):
                from .passes.narrow_width import supported_module_names

                lines.append(f"  supported layers: {', '.join(supported_module_names())}")
        change = (self.params_after - self.params_before) / max(self.params_before, 1) * 100
        lines.append(
            f"parameters: {self.params_before:,} before -> {self.params_after:,} after ({change:+.1f}%)"
        )
        return "\n".join(lines)
