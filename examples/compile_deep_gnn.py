"""Compile your own deep residual GNN with gsr_compile and see what changed.

    python examples/compile_deep_gnn.py            # about a minute on 2 CPU cores

The model below is written the ordinary way: a ModuleList of pre-norm residual blocks,
each reading the graph (edge_index) and the edge features (edge_attr).
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import GINEConv

from gsr_compiler import compare_memory, gsr_compile
from gsr_compiler.circuits import load_circuit


class Block(nn.Module):
    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))
        self.conv = GINEConv(mlp, edge_dim=1)
        self.dropout = dropout

    def forward(self, h, edge_index, edge_attr):
        h = F.dropout(F.relu(self.norm(h)), self.dropout, training=self.training)
        return self.conv(h, edge_index, edge_attr)


class DeepGNN(nn.Module):
    def __init__(self, in_channels: int, width: int = 32, depth: int = 64, dropout: float = 0.1):
        super().__init__()
        self.encoder = nn.Linear(in_channels, width)
        self.blocks = nn.ModuleList(Block(width, dropout) for _ in range(depth))
        self.decoder = nn.Linear(width, 1)

    def forward(self, x, edge_index, edge_attr):
        h = self.encoder(x)
        for block in self.blocks:
            h = h + block(h, edge_index, edge_attr)
        return self.decoder(h)


def main():
    data = load_circuit("c1908")  # an ISCAS85 circuit bundled with circuitgraph
    x, edge_index = data.x.float(), data.edge_index
    edge_attr = torch.ones(edge_index.shape[1], 1)
    target = data.level_norm.float().unsqueeze(1)

    torch.manual_seed(0)
    model = DeepGNN(x.shape[1])
    gsr_model = gsr_compile(model, groups=2, example_inputs=(x, edge_index, edge_attr))
    print(gsr_model.explain())
    gsr_model.graph_module.print_readable()

    optimizer = torch.optim.Adam(gsr_model.parameters(), lr=1e-3)
    for step in range(20):
        optimizer.zero_grad()
        loss = F.mse_loss(gsr_model(x, edge_index, edge_attr), target)
        loss.backward()
        optimizer.step()
    print(f"loss after 20 steps: {loss.item():.4f}")

    print(compare_memory(model, gsr_model, (x, edge_index, edge_attr), target=target,
                         timing_steps=1))


if __name__ == "__main__":
    main()
