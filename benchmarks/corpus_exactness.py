"""Gradients of a compiled corpus model against its store-everything reference, at depth.

    OMP_NUM_THREADS=1 python benchmarks/corpus_exactness.py resgen_arxiv --depth 256 --width 16

Prints the chains' couplings and ``verify_gradients``'s report (float32, tolerance 1e-3 unless
given): the largest relative gradient errors and what the replay guard kept and measured.
``--steps N`` runs N training steps (forward and backward) first, as training would, so that
the chains have calibrated their drift prediction; ``--against float64`` measures against the
store-everything run in float64, with float32's own rounding as the floor.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gsr_compiler import gsr_compile  # noqa: E402
from tests.corpus.corpus import CORPUS, build, scalar_loss  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=list(CORPUS))
    ap.add_argument("--depth", type=int, default=256)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--tolerance", type=float, default=1e-3)
    ap.add_argument("--anchors", type=int, default=None,
                    help="GSRConfig.anchors: an exact block input every N blocks (default: auto)")
    ap.add_argument("--steps", type=int, default=0,
                    help="forward and backward steps before the check (default 0)")
    ap.add_argument("--against", choices=["reference", "float64"], default="reference",
                    help="verify_gradients's reference (default: store-everything in float32)")
    ap.add_argument("--drift-tolerance", type=float, default=None,
                    help="GSRConfig.drift_tolerance (default: the config's)")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    model, inputs = build(args.model, depth=args.depth, width=args.width)
    options = {} if args.anchors is None else {"anchors": args.anchors}
    if args.drift_tolerance is not None:
        options["drift_tolerance"] = args.drift_tolerance
    gsr = gsr_compile(model, example_inputs=inputs, **options)
    print("couplings:", [c.coupling for c in gsr.report.chains])
    for _ in range(args.steps):
        scalar_loss(gsr(*inputs)).backward()
    check = gsr.verify_gradients(inputs, loss_fn=scalar_loss, tolerance=args.tolerance,
                                 against=args.against)
    print(check)
    return 0 if check.ok else 1


if __name__ == "__main__":
    sys.exit(main())
