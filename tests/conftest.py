"""Test-wide set-up.

Triton kernels are tested on the CPU through Triton's interpreter. The variable must be
set before triton is first imported, so it is set here, before any test module loads.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
