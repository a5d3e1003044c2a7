"""Memory budgets: parsing ``"6GiB"``, and choosing the options that make a step fit one.

``parse_budget`` accepts a positive number of bytes or a string with a unit: binary (KiB, MiB,
GiB, TiB) or decimal (KB, MB, GB, TB, and B), case-insensitive, e.g. ``"6GiB"``, ``"512MiB"``,
``"1.5GB"``.

``choose_options`` is what ``GSRConfig.memory_budget`` runs at compile time: it tries the
options the compiler controls in order of the extra compute they cost, predicts each one's step
peak at the traced size from its compiled graph (:mod:`gsr_compiler.peak`), and keeps the first
that fits. The order, cheapest first:

1. the configuration as given;
2. ``recompute_head=True`` and ``plan_memory=True`` (head recomputed per row block: a head's
   forward again; the arena: no extra compute), if they were off;
3. more channel groups (4, 8, ... while they divide the width): narrower branches recomputed
   one at a time; the arithmetic is the same, the kernels narrower;
4. ``sparse_k`` (the group top-k at half, then a quarter, then an eighth of each group): the
   compressed activations are smaller, the top-k costs a selection. It changes the function, so it
   is only tried when ``sparse_k`` was not set to a value already.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

__all__ = ["parse_budget", "BudgetChoice", "UNITS", "compile_within_budget"]

#: Unit -> bytes.
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_PATTERN = re.compile(r"^\s*([+-]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_budget(value: Any, name: str = "memory_budget") -> int:
    """Bytes of a budget given as an int/float of bytes or a string such as ``"6GiB"``.

    Raises ``ValueError`` naming ``name`` for a negative, zero, NaN, infinite or unparsable
    budget, or an unknown unit.
    """
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: must be a number of bytes or a string such as "
                         "'6GiB', not a bool")
    if isinstance(value, (int, float)):
        nbytes, text = float(value), repr(value)
    elif isinstance(value, str):
        text = repr(value)
        m = _PATTERN.match(value)
        if m is None:
            raise ValueError(f"{name}={value!r}: cannot read it as a size; write a number and "
                             "a unit, e.g. '6GiB', '512MiB', '1.5GB' (units: "
                             f"{', '.join(_unit_names())})")
        number, unit = m.group(1), m.group(2).lower()
        if unit and unit not in UNITS:
            raise ValueError(f"{name}={value!r}: unknown unit {m.group(2)!r}; use one of "
                             f"{', '.join(_unit_names())} (or a plain number of bytes)")
        nbytes = float(number) * UNITS[unit or "b"]
    else:
        raise ValueError(f"{name}={value!r}: must be a number of bytes or a string such as "
                         f"'6GiB', not {type(value).__name__}")
    if math.isnan(nbytes) or math.isinf(nbytes):
        raise ValueError(f"{name}={text}: must be a finite number of bytes")
    if nbytes <= 0:
        raise ValueError(f"{name}={text}: must be positive (a number of bytes, or e.g. '6GiB')")
    if nbytes < 1:
        raise ValueError(f"{name}={text}: is less than one byte")
    return int(nbytes)


def _unit_names() -> list[str]:
    return ["B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"]


@dataclass
class BudgetChoice:
    """What ``memory_budget`` chose, for ``explain()``."""

    budget: int
    options: dict
    predicted_peak: int
    tried: list = field(default_factory=list)  # (options, predicted peak), in the order tried

    def lines(self) -> list[str]:
        from .report import format_bytes

        chosen = ", ".join(f"{k}={v!r}" for k, v in self.options.items()) or "the options as given"
        out = [f"memory budget {format_bytes(self.budget)}: chose {chosen}; predicted step peak "
               f"{format_bytes(self.predicted_peak)} at the traced size"]
        for options, peak in self.tried[:-1]:
            what = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "the options as given"
            out.append(f"  tried {what}: {format_bytes(peak)}, over the budget")
        return out


def candidate_options(config, width: Optional[int]) -> list[dict]:
    """Option overrides, cheapest in extra compute first (see the module docstring)."""
    out: list[dict] = [{}]
    base: dict = {}
    if not config.recompute_head or not config.plan_memory:
        base = {"recompute_head": True, "plan_memory": True}
        out.append(dict(base))
    groups = [config.groups]
    if width:
        g = config.groups * 2
        while g <= width and width % g == 0 and width // g >= 8:  # narrower norms drift
            groups.append(g)
            out.append({**base, "groups": g})
            g *= 2
    if config.sparse_k is None and width:
        for G in groups:
            gw = width // G
            for k in sorted({max(1, gw // 2), max(1, gw // 4), max(1, gw // 8)}, reverse=True):
                opts = {**base, "sparse_k": k}
                if G != config.groups:
                    opts["groups"] = G
                out.append(opts)
    return out


def choose_options(config, width: Optional[int],
                   predict: Callable[[dict], int]) -> tuple[dict, int, list]:
    """The first candidate whose predicted peak (``predict(overrides)``) fits
    ``config.memory_budget``: ``(overrides, peak, tried)``; ``tried`` lists every candidate
    predicted, and the last one's peak is the smallest seen when none fits."""
    budget = config.memory_budget
    tried = []
    for overrides in candidate_options(config, width):
        peak = predict(overrides)
        tried.append((overrides, peak))
        if peak <= budget:
            return overrides, peak, tried
    return None, min(p for _, p in tried), tried


def _parameter_floor(model) -> int:
    """Parameters, gradients and Adam's two moments: what no option of the compiler shrinks."""
    from .peak import OPTIMIZER_STATES

    seen = {id(p): p.numel() * p.element_size() for p in model.parameters()}
    return (2 + OPTIMIZER_STATES["adam"]) * sum(seen.values())


def compile_within_budget(model, config, example_inputs, example_kwargs=None):
    """``gsr_compile`` under ``config.memory_budget``: the compiled model whose predicted step
    peak at the traced size fits, its choice recorded for ``explain()``; raises
    ``GSRCompileError`` (nothing returned, the model untouched) when no option fits."""
    from dataclasses import replace

    from .api import GSRModule
    from .errors import GSRCompileError
    from .report import format_bytes

    budget = config.memory_budget
    if example_inputs is None:
        raise GSRCompileError(
            f"memory_budget={format_bytes(budget)} needs example_inputs= (the step must fit at "
            "the size of those inputs, chosen when compiling); pass gsr_compile(model, "
            "memory_budget=..., example_inputs=(x, edge_index))")
    floor = _parameter_floor(model)
    if floor > budget:  # before tracing anything
        raise GSRCompileError(
            f"memory_budget={format_bytes(budget)} is below what the parameters alone need: "
            f"{format_bytes(floor)} (parameters, their gradients and Adam's two moments); use a "
            "model with fewer parameters (smaller width or depth) or a larger budget")
    built: dict = {}
    device = "cpu"

    def predict(overrides: dict) -> int:
        nonlocal device
        cfg = replace(config, memory_budget=None, **overrides)
        candidate = GSRModule(model, cfg, example_inputs=example_inputs,
                              example_kwargs=example_kwargs)
        device = candidate._device()
        built[tuple(sorted(overrides.items()))] = candidate
        return candidate.predict_peak(device=device).total

    probe = predict({})
    width = candidate_width(built[()])
    if probe <= budget:
        chosen, peak, tried = {}, probe, [({}, probe)]
    else:
        first = [({}, probe)]
        cache = {(): probe}

        def cached(overrides: dict) -> int:
            key = tuple(sorted(overrides.items()))
            if key not in cache:
                cache[key] = predict(overrides)
            return cache[key]

        chosen, peak, tried = choose_options(config, width, cached)
        tried = first + [t for t in tried if t[0]]
    if chosen is None:
        best_key, best = min(((tuple(sorted(o.items())), p) for o, p in tried), key=lambda t: t[1])
        smallest = built[best_key]
        nodes = smallest.max_nodes(budget, device=device)
        N = smallest.liveness.num_nodes
        what = ", ".join(f"{k}={v!r}" for k, v in dict(best_key).items()) or "the options as given"
        width_hint = ""
        if width:
            fixed = smallest.predict_peak(0, 0, device=device).total
            share = (budget - fixed) / max(best - fixed, 1)
            if 0 < share < 1:
                width_hint = f", or a width of about {max(1, int(width * share))} instead of {width}"
        raise GSRCompileError(
            f"memory_budget={format_bytes(budget)}: no choice of options fits a training step on "
            f"these inputs ({N:,} nodes). The smallest predicted step peak is "
            f"{format_bytes(best)} (with {what}). What would fit: a graph or batch of at most "
            f"{nodes:,} nodes at the same degree{width_hint}; or a larger budget.")
    result = built[tuple(sorted(chosen.items()))]
    result.config = replace(result.config, memory_budget=budget)  # what it was compiled for
    result.__dict__["_budget_choice"] = BudgetChoice(budget, chosen, peak, tried)
    return result


def candidate_width(gsr_model) -> Optional[int]:
    """The channel width of the model's first reversible chain (None without chains)."""
    chains = gsr_model.report.chains
    return chains[0].width if chains else None
