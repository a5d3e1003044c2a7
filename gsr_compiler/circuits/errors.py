"""Errors raised while turning netlists into graphs.

Each error names the file (and the line, where one is known) so that a user
with a 100k-line netlist can jump straight to the problem.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

__all__ = [
    "NetlistError",
    "NetlistSyntaxError",
    "CombinationalLoopError",
    "UnknownCircuitError",
]


class NetlistError(ValueError):
    """A netlist could not be turned into a circuit graph.

    Attributes:
        path: the netlist file.
        line: 1-based line number of the offending statement, or ``None``.
    """

    def __init__(self, path: os.PathLike | str, message: str, line: Optional[int] = None):
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class NetlistSyntaxError(NetlistError):
    """The netlist text does not parse (wraps the parser's own error)."""

    def __init__(
        self,
        path: os.PathLike | str,
        message: str,
        line: Optional[int] = None,
        column: Optional[int] = None,
    ):
        self.column = column
        super().__init__(path, message, line)


class CombinationalLoopError(NetlistError):
    """The netlist has a cycle that does not pass through a flip-flop.

    Attributes:
        cycle: node names along the loop, in signal-flow order.
    """

    def __init__(
        self,
        path: os.PathLike | str,
        circuit: str,
        cycle: Sequence[str],
        line: Optional[int] = None,
    ):
        self.circuit = circuit
        self.cycle = list(cycle)
        shown = list(self.cycle[:8]) + (["..."] if len(self.cycle) > 8 else [])
        message = (
            f"circuit '{circuit}' has a combinational loop through node "
            f"'{self.cycle[0]}' ({' -> '.join(shown + [self.cycle[0]])}); "
            "only loops through flip-flops can be cut"
        )
        super().__init__(path, message, line)


class UnknownCircuitError(LookupError):
    """A circuit name is neither a bundled netlist nor an existing file."""

    def __init__(self, name: str, suggestions: Sequence[str]):
        self.name = name
        self.suggestions = list(suggestions)
        hint = (
            f"did you mean: {', '.join(self.suggestions)}?"
            if self.suggestions
            else "no similar names."
        )
        super().__init__(
            f"unknown circuit '{name}'; {hint} "
            "See gsr_compiler.circuits.list_circuits() for the bundled netlists, "
            "or pass a path to a .v / .bench file."
        )
