#!/usr/bin/env bash
# Prepares benchmarks/gpu_check.py for a GPU machine that cannot reach a package index and has
# PyTorch, Triton and torch_geometric but not the packages below: their wheels (CPython 3.12,
# manylinux x86-64, pure Python where they are) go into the ignored folder .whl/, which travels
# with the checkout. Prints the one command to run there, from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."

# What gsr_compiler imports that the GPU image lacks (its other needs, numpy, scipy, networkx,
# tqdm, matplotlib, psutil, pytest, are there).
PACKAGES=(circuitgraph lark)

rm -rf .whl
mkdir -p .whl
for name in "${PACKAGES[@]}"; do
    version=$(python3 -m pip show "$name" 2>/dev/null | awk '/^Version:/ {print $2}')
    spec="$name${version:+==$version}"  # the version tested here, where it is installed
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "$spec"
done

size=$(du -sm .whl | cut -f1)
if [ "$size" -gt 48 ]; then
    echo "gpu_prepare: .whl holds ${size} MiB; the tree that travels must stay under 64 MiB" >&2
    exit 1
fi
git check-ignore -q .whl || { echo "gpu_prepare: .whl/ must be ignored by git" >&2; exit 1; }

echo "wheels in .whl/ (${size} MiB): $(cd .whl && ls | tr '\n' ' ')"
echo "run on the GPU machine, from the repository root, carrying .whl:"
echo "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade" \
     "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 &&" \
     "python3 benchmarks/gpu_check.py --out \$OUT"
