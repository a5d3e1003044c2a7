"""``python -m gsr_compiler.circuits``: the bundled circuits, and a cache warm-up.

    python -m gsr_compiler.circuits                 # markdown table of the 65 circuits
    python -m gsr_compiler.circuits --load          # load all 65 with all labels, timed
    python -m gsr_compiler.circuits --load --fresh  # the same from an empty cache (cold)

The first run parses every netlist (about a minute on 2 cores); later runs read the cache.
"""

from __future__ import annotations

import argparse
import time

from .cache import CircuitCache
from .loading import format_circuit_table, list_circuits, load_circuit


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m gsr_compiler.circuits",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cache-dir", default=None, help="cache folder (default: user cache)")
    parser.add_argument("--load", action="store_true", help="load every circuit with all labels")
    parser.add_argument("--fresh", action="store_true", help="empty the cache first")
    args = parser.parse_args(argv)

    if args.fresh:
        CircuitCache(args.cache_dir).clear()
    if not args.load:
        print(format_circuit_table(list_circuits(cache_dir=args.cache_dir, progress=True)))
        return

    from tqdm.auto import tqdm

    names = [info.name for info in list_circuits(stats=False)]
    start = time.perf_counter()
    for name in tqdm(names, desc="loading", unit="circuit"):
        load_circuit(name, cache_dir=args.cache_dir)
    elapsed = time.perf_counter() - start
    print(f"loaded {len(names)} circuits with all labels in {elapsed:.1f} s")


if __name__ == "__main__":
    main()
