"""Real circuit netlists as PyG graphs: loading, labels, cone sampling, splits, metrics.

>>> from gsr_compiler.circuits import load_circuit, ConeSampler, split_by_family
>>> data = load_circuit("c6288")                   # Data(x, edge_index, level, prob, ...)
>>> loader = ConeSampler(load_circuit("b19_Cg"), max_nodes=20_000)
>>> split = split_by_family()                       # deep EPFL arithmetic in test

See ``docs/circuits.md``.
"""

from .cache import CircuitCache, default_cache_dir
from .errors import CombinationalLoopError, NetlistError, NetlistSyntaxError, UnknownCircuitError
from .gates import FEATURE_NAMES, GATE_TYPES
from .labels import LABELS, logic_level, reverse_level, signal_probability, toggle_rate
from .library import family_of, suite_of
from .loading import CircuitInfo, list_circuits, load_circuit, load_netlist
from .metrics import RegressionMetrics, average_metrics, regression_metrics
from .netlist import Netlist, parse_netlist, read_netlist
from .sampling import ConeSampler
from .splits import DEEP_ARITHMETIC, CircuitSplit, split_by_family

__all__ = [
    # loading
    "list_circuits",
    "load_circuit",
    "load_netlist",
    "CircuitInfo",
    "LABELS",
    "FEATURE_NAMES",
    "GATE_TYPES",
    # parsing
    "parse_netlist",
    "read_netlist",
    "Netlist",
    # labels
    "logic_level",
    "reverse_level",
    "signal_probability",
    "toggle_rate",
    # cache
    "CircuitCache",
    "default_cache_dir",
    # sampling, splits, metrics
    "ConeSampler",
    "split_by_family",
    "CircuitSplit",
    "DEEP_ARITHMETIC",
    "family_of",
    "suite_of",
    "regression_metrics",
    "average_metrics",
    "RegressionMetrics",
    # errors
    "NetlistError",
    "NetlistSyntaxError",
    "CombinationalLoopError",
    "UnknownCircuitError",
]
