"""``gsr demo``: a 128-block residual GNN on a real circuit, compiled, measured, trained."""
from __future__ import annotations

import os

import torch


def _load(circuit: str):
    from .circuits import load_circuit

    data = load_circuit(circuit)
    x = data.x.float()
    level = data.level.float()
    target = (level / level.max().clamp_min(1)).unsqueeze(1)  # logic level, normalized
    return data, x, data.edge_index, target


def run_demo(circuit: str = "c6288", depth: int = 128, width: int = 32, steps: int = 20,
             groups: int = 2, sparse_k: int | None = None, out_dir: str = "gsr-demo", measure: bool = True) -> dict:
    """Runs the demo and returns its figures (also written to ``out_dir``).

    ``sparse_k``: the group top-k of ``gsr_compile`` (None: dense ReLU); ``gsr demo`` passes
    :func:`~gsr_compiler.config.default_sparse_k`.
    """
    from scipy.stats import kendalltau, pearsonr
    from tqdm import tqdm

    from . import compare_memory, gsr_compile
    from .models import ResidualGNN

    os.makedirs(out_dir, exist_ok=True)
    data, x, edge_index, target = _load(circuit)
    print(f"circuit {circuit}: {x.shape[0]} nodes, {edge_index.shape[1]} edges, "
          f"logic depth {int(data.level.max())}; task: predict each gate's logic level")

    torch.manual_seed(0)
    model = ResidualGNN(x.shape[1], width, 1, depth, conv="sage", dropout=0.1)
    gsr_model = gsr_compile(model, groups=groups, sparse_k=sparse_k, example_inputs=(x, edge_index))
    print()
    print(gsr_model.explain())
    picture = gsr_model.save_graph(os.path.join(out_dir, "rewritten_graph.png"))
    print(f"rewritten graph: {picture}")

    figures: dict = {"circuit": circuit, "depth": depth, "width": width, "sparse_k": sparse_k}
    if measure:
        print("\nmemory of one training step (each model in fresh subprocesses):")
        comparison = compare_memory(model, gsr_model, (x, edge_index), target=target,
                                    timing_steps=2)
        print(comparison)
        with open(os.path.join(out_dir, "memory.txt"), "w") as f:
            f.write(str(comparison) + "\n")
        figures["saved_ratio"] = comparison.ratio("saved_bytes")
        figures["rss_rise_ratio"] = comparison.ratio("rss_rise")

    print(f"\ntraining the compiled model for {steps} steps:")
    optimizer = torch.optim.Adam(gsr_model.parameters(), lr=2e-3)
    gsr_model.train()
    bar = tqdm(range(steps), desc="train", unit="step")
    for _ in bar:
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(gsr_model(x, edge_index), target)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    print("exactness of the last backward (docs/exactness.md):")
    print("  " + gsr_model.precision_report().replace("\n", "\n  "))
    gsr_model.eval()
    with torch.no_grad():
        pred = gsr_model(x, edge_index).squeeze(1).numpy()
    truth = target.squeeze(1).numpy()
    figures["loss"] = loss.item()
    figures["pearson"] = float(pearsonr(pred, truth)[0])
    figures["kendall"] = float(kendalltau(pred, truth)[0])
    print(f"after {steps} steps: loss {figures['loss']:.4f}, Pearson {figures['pearson']:.3f}, "
          f"Kendall {figures['kendall']:.3f} (on the training circuit; `gsr train` evaluates on "
          "held-out circuits)")
    return figures
