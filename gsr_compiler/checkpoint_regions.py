"""Turning the nodes of a checkpointed function into one ``CheckpointedRegion`` call.

``checkpoint(fn, *args)`` with ``fn`` a function (not a module) is traced through: whatever
``fn`` reads, closures included, becomes graph edges. The tracer marks the nodes it ran with
``node.meta["gsr_checkpoint_region"]``; :func:`wrap_checkpoint_regions` then moves them into a
:class:`~gsr_compiler.runtime.checkpointed_region.CheckpointedRegion` and leaves one
``call_module`` node marked ``node.meta["gsr_checkpoint"]``, as the tracer marks
``checkpoint(module, ...)``: a chain may take it as a branch, and otherwise it is checkpointed
again as the user wrote it.
"""
from __future__ import annotations

import operator
from torch import fx, nn

from .runtime.checkpointed_region import CheckpointedRegion, code_digest

REGION = "gsr_checkpoint_region"


def wrap_checkpoint_regions(gm: fx.GraphModule, records: dict[int, object]) -> dict[int, str]:
    """Replaces each marked region of ``gm`` by a call of a ``CheckpointedRegion``.

    ``records`` maps a region id to its ``CheckpointRecord`` (``module`` empty); each wrapped
    region's record is replaced by one naming the new module. Returns why each region left
    traced through was not wrapped, by id."""
    regions: dict[int, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        rid = node.meta.get(REGION)
        if rid is not None and node.op not in ("get_attr", "placeholder", "output"):
            regions.setdefault(rid, []).append(node)
    refused = {}
    for rid, nodes in regions.items():
        why = _wrap(gm, rid, nodes, records)
        if why:
            refused[rid] = why
    gm.graph.lint()
    gm.recompile()
    return refused


def _wrap(gm: fx.GraphModule, rid: int, nodes: list[fx.Node], records: dict) -> str | None:
    record = records[rid]
    inside = set(nodes)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    if not outputs:
        return "its result is not used"
    inputs: list[fx.Node] = []
    for n in nodes:
        for i in n.all_input_nodes:
            if i not in inside and i not in inputs:
                inputs.append(i)
    graph = fx.Graph()
    env = {i: graph.placeholder(f"in_{k}") for k, i in enumerate(inputs)}
    root = nn.Module()  # holds the body's layers while the GraphModule is built
    shared: dict[str, str] = {}
    for n in nodes:
        new = graph.node_copy(n, env.__getitem__)
        if n.op == "call_module":
            local = str(n.target).replace(".", "_")
            if local not in shared:
                setattr(root, local, gm.get_submodule(n.target))
                shared[local] = str(n.target)
            new.target = local
        env[n] = new
    graph.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
    body = fx.GraphModule(root, graph, class_name="CheckpointedFunction")
    region = CheckpointedRegion(body, record.type_name, shared)
    # Named after its code too: a retrace in another mode may run other code for the function.
    name = (f"gsr_checkpoint_{rid}_" + "".join(c if c.isalnum() else "_" for c in record.type_name)
            + f"_{code_digest(body)}")
    gm.add_submodule(name, region)
    with gm.graph.inserting_after(nodes[-1]):
        call = gm.graph.call_module(name, tuple(inputs))
    call.meta["gsr_checkpoint"] = record.__class__(name, record.type_name, record.options,
                                                   record.where)
    records[rid] = call.meta["gsr_checkpoint"]
    if len(outputs) == 1:
        outputs[0].replace_all_uses_with(call, delete_user_cb=lambda u: u not in inside)
    else:
        with gm.graph.inserting_after(call):
            for k, o in enumerate(outputs):
                part = gm.graph.call_function(operator.getitem, (call, k))
                o.replace_all_uses_with(part, delete_user_cb=lambda u: u not in inside
                                        and u is not part)
    for n in reversed(nodes):
        gm.graph.erase_node(n)
    return None

