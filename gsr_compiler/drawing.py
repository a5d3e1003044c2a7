"""Pictures of a rewritten graph.

With pydot and graphviz's ``dot`` installed, torch.fx's own ``FxGraphDrawer`` writes SVG
or PNG. Without them, matplotlib (a dependency) draws the nodes as a column of labelled
boxes in execution order, with arrows for data flow.
"""
from __future__ import annotations

import os
import shutil
import tempfile

from torch import fx


def _label(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        extra = f" {module.extra_repr()}" if module.extra_repr() else ""
        return f"{node.name}: {type(module).__name__}{extra}"
    if node.op == "call_function":
        return f"{node.name}: {getattr(node.target, '__name__', node.target)}"
    if node.op == "call_method":
        return f"{node.name}: .{node.target}()"
    return f"{node.name} ({node.op})"


def _draw_with_matplotlib(gm: fx.GraphModule, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = list(gm.graph.nodes)
    row = {n: i for i, n in enumerate(nodes)}
    height = max(2.0, 0.55 * len(nodes))
    fig, ax = plt.subplots(figsize=(8, height))
    for n in nodes:
        y = -row[n]
        color = "#f4c542" if n.op == "call_module" and "gsr_chain" in str(n.target) else "#dde6f5"
        ax.text(0.5, y, _label(gm, n), ha="center", va="center", fontsize=9,
                bbox=dict(boxstyle="round", facecolor=color, edgecolor="#555"))
        for i, src in enumerate(n.all_input_nodes):
            offset = 0.02 * i
            ax.annotate("", xy=(0.5 + offset, y + 0.3), xytext=(0.5 + offset, -row[src] - 0.3),
                        arrowprops=dict(arrowstyle="->", color="#777",
                                        connectionstyle=f"arc3,rad={0.3 if row[n] - row[src] > 1 else 0}"))
    ax.set_xlim(0, 1)
    ax.set_ylim(-len(nodes), 1)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_graph(gm: fx.GraphModule, path: str) -> str:
    """Writes a picture of ``gm`` to ``path`` (.svg or .png); returns the path.

    The file is written atomically: a failure leaves no partial picture behind.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".svg", ".png"):
        raise ValueError(f"cannot write '{path}': choose a .svg or .png file name")
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=ext, dir=directory)
    os.close(fd)
    try:
        try:
            import pydot  # noqa: F401
            from torch.fx.passes.graph_drawer import FxGraphDrawer

            if shutil.which("dot") is None:
                raise ImportError("graphviz 'dot' not found")
            dot = FxGraphDrawer(gm, type(gm).__name__).get_dot_graph()
            (dot.write_svg if ext == ".svg" else dot.write_png)(tmp)
        except ImportError:
            _draw_with_matplotlib(gm, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
