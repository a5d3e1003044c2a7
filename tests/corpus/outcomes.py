"""Prints, per corpus model, what ``gsr_compile`` does with it today: converts, unchanged
(with explain()'s reasons) or fails (with the first line of the error).

    python -m tests.corpus.outcomes
"""
from __future__ import annotations

import warnings

from gsr_compiler import gsr_compile

from .corpus import CORPUS, EXPECTED, build


def outcome(name: str) -> tuple[str, str]:
    model, inputs = build(name)
    try:
        gsr = gsr_compile(model, example_inputs=inputs)
        gsr(*inputs)
    except Exception as e:  # noqa: BLE001 - the point is to report any failure
        first = (str(e).strip().splitlines() or [""])[0]
        return "fails", f"{type(e).__name__}: {first}"
    report = gsr.report
    if report.chains:
        return "converts", "; ".join(f"{c.name}: {c.depth} blocks" for c in report.chains)
    reasons = "; ".join(f"{where}: {why}" for where, why in report.not_converted)
    return "unchanged", reasons or "no residual chain found"


def main() -> None:
    warnings.simplefilter("ignore")
    for name in CORPUS:
        status, detail = outcome(name)
        print(f"{name:18s} expected {EXPECTED[name]:9s} now {status:9s} {detail}")


if __name__ == "__main__":
    main()
