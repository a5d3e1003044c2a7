"""Models whose forward takes one PyG ``Data``/``Batch`` (``forward(self, data)``): traced with
the Data's tensors as graph inputs, specialized on its keys, values and num_graphs."""
import pytest
import torch
import torch.nn.functional as F
import torch_geometric.nn as pyg
from torch import nn
from torch_geometric.data import Batch, Data
from torch_geometric.loader import DataLoader

from gsr_compiler import GSRCompileError, gsr_compile
from gsr_compiler.data_inputs import DataSignature
from gsr_compiler.reference import store_everything

WIDTH = 16


class Block(nn.Module):
    """``conv(relu(norm(h)), edge_index, edge_weight)``, the branch of ``h + f(h)``."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.conv = pyg.GraphConv(WIDTH, WIDTH)

    def forward(self, h, edge_index, edge_weight=None):
        h = F.dropout(F.relu(self.norm(h)), p=0.2, training=self.training)
        return self.conv(h, edge_index, edge_weight)


class DataGNN(nn.Module):
    """A deep residual GNN written against a Data, as OGB and DeepGCN code is: edge features
    (when present) weight the edges, a Batch is pooled per graph."""

    def __init__(self, depth=4, in_channels=5, edge_dim=3, out_channels=2):
        super().__init__()
        self.encoder = nn.Linear(in_channels, WIDTH)
        self.edge_encoder = nn.Linear(edge_dim, 1)
        self.node_bias = nn.Parameter(torch.randn(1, WIDTH))
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.decoder = nn.Linear(WIDTH, out_channels)

    def forward(self, data):
        x, edge_index = data.x, data.edge_index
        edge_weight = None
        if data.edge_attr is not None:
            edge_weight = torch.sigmoid(self.edge_encoder(data.edge_attr)).squeeze(-1)
        h = self.encoder(x) + self.node_bias.expand(data.num_nodes, -1)
        for block in self.blocks:
            h = h + block(h, edge_index, edge_weight)
        if data.batch is not None:
            h = h.new_zeros(data.num_graphs, WIDTH).index_add(0, data.batch, h)
        return self.decoder(h)


def graph(nodes=14, edges=40, edge_dim=3, seed=0, **extra):
    g = torch.Generator().manual_seed(seed)
    data = Data(x=torch.randn(nodes, 5, generator=g, dtype=torch.float64),
                edge_index=torch.randint(0, nodes, (2, edges), generator=g), **extra)
    if edge_dim:
        data.edge_attr = torch.randn(edges, edge_dim, generator=g, dtype=torch.float64)
    return data


def batch_of(*sizes, seed=0, **options):
    return Batch.from_data_list([graph(n, 3 * n, seed=seed + i, **options)
                                 for i, n in enumerate(sizes)])


def model(depth=4, seed=0):
    torch.manual_seed(seed)
    return DataGNN(depth).double()


def placeholders(gsr):
    return [n.target for n in gsr.graph_module.graph.nodes if n.op == "placeholder"]


def flat_inputs(gsr, data):
    """The Data's tensors in the order of the compiled graph's placeholders."""
    return [data[name.removeprefix("data_")] for name in placeholders(gsr)]


def step(module, inputs, seed=3):
    torch.manual_seed(seed)
    module.zero_grad(set_to_none=True)
    out = module(*inputs)
    out.pow(2).sum().backward()
    return out.detach(), {n.removeprefix("compiled."): p.grad.clone()
                          for n, p in module.named_parameters()}


def assert_matches_store_everything(gsr, data):
    out, grads = step(gsr, (data,))
    ref_out, ref_grads = step(store_everything(gsr.graph_module), flat_inputs(gsr, data))
    assert torch.allclose(out, ref_out, rtol=0, atol=1e-9)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        assert torch.allclose(grad, ref_grads[name], rtol=0, atol=1e-9), name


def unconverted(depth=4):
    """The model compiled with no chain converted: it must compute what eager computes."""
    return gsr_compile(model(depth), min_chain_blocks=depth + 1)


# -- one Data ------------------------------------------------------------------------------

def test_forward_taking_a_data_compiles_its_chain_and_matches_store_everything():
    data = graph()
    gsr = gsr_compile(model(), example_inputs=(data,))
    assert placeholders(gsr) == ["data_edge_attr", "data_edge_index", "data_x"]
    assert [c.depth for c in gsr.report.chains] == [4]
    assert_matches_store_everything(gsr, data)
    check = gsr.verify_gradients((data,))
    assert check.ok and check.worst[1] < 1e-9, str(check)


def test_unconverted_data_model_equals_eager():
    data, eager, gsr = graph(), model(), unconverted()
    eager.eval(), gsr.eval()
    assert torch.equal(gsr(data), eager(data))
    assert placeholders(gsr) == ["data_edge_attr", "data_edge_index", "data_x"]


def test_graphs_of_other_sizes_reuse_the_trace():
    gsr = gsr_compile(model())
    for n in (10, 14, 23):
        gsr(graph(n, 3 * n))
    assert len(gsr._graphs) == 1  # num_nodes is data_x.size(0), not a number
    assert "size" in gsr.graph_module.code


# -- keys ----------------------------------------------------------------------------------

def test_other_keys_retrace_and_read_as_eager_reads_them():
    eager, gsr = model(), unconverted()
    eager.eval(), gsr.eval()
    with_attr, without = graph(), graph(edge_dim=None)
    assert torch.equal(gsr(with_attr), eager(with_attr))
    assert torch.equal(gsr(without), eager(without))  # data.edge_attr is None: retraced
    assert len(gsr._graphs) == 2
    assert "data_edge_attr" not in placeholders(gsr)
    # a key the Data holds but the forward does not read is still a graph input of its own
    extra = graph(y=torch.zeros(14))
    assert torch.equal(gsr(extra), eager(extra)) and "data_y" in placeholders(gsr)


def test_a_key_the_data_lacks_raises_what_eager_raises():
    class ReadsMissing(DataGNN):
        def forward(self, data):
            return self.decoder(self.encoder(data.x) + data.virtual_node)

    torch.manual_seed(0)
    eager = ReadsMissing().double()
    with pytest.raises(AttributeError) as expected:
        eager(graph())
    with pytest.raises(AttributeError) as got:
        gsr_compile(ReadsMissing().double())(graph())
    assert str(got.value) == str(expected.value)


def test_non_tensor_values_are_specialized():
    class Scaled(DataGNN):
        def forward(self, data):
            return self.decoder(self.encoder(data.x) * data.scale)

    torch.manual_seed(0)
    gsr = gsr_compile(Scaled().double())
    torch.manual_seed(0)
    eager = Scaled().double()
    for scale in (2.0, 3.0):
        assert torch.equal(gsr(graph(scale=scale)), eager(graph(scale=scale)))
    assert len(gsr._graphs) == 2


def test_stored_num_nodes_that_matches_x_is_a_shape_and_otherwise_a_value():
    gsr = gsr_compile(model())
    gsr(graph(10, 30, num_nodes=10))
    gsr(graph(12, 36, num_nodes=12))
    assert len(gsr._graphs) == 1
    assert DataSignature.of(graph(10, 30, num_nodes=10)).num_nodes == ("shape", "x", 0)
    # a stored num_nodes that x does not have: specialized on the number, as eager reads it
    # (here the node bias then fails to broadcast, in eager as compiled)
    assert DataSignature.of(graph(10, 30, num_nodes=11)).num_nodes == ("value", 11)
    with pytest.raises(RuntimeError, match=r"\(10\) must match the size of tensor b \(11\)"):
        model()(graph(10, 30, num_nodes=11))
    with pytest.raises(RuntimeError, match=r"\(10\) must match the size of tensor b \(11\)"):
        gsr(graph(10, 30, num_nodes=11))


# -- Batch ---------------------------------------------------------------------------------

def test_batch_with_global_pooling_matches_store_everything_and_eager():
    batch = batch_of(6, 9, 13)
    gsr = gsr_compile(model(), example_inputs=(batch,))
    assert "data_batch" in placeholders(gsr) and "data_ptr" in placeholders(gsr)
    assert [c.depth for c in gsr.report.chains] == [4]
    assert_matches_store_everything(gsr, batch)
    eager, plain = model(), unconverted()
    eager.eval(), plain.eval()
    assert torch.equal(plain(batch), eager(batch)) and plain(batch).shape == (3, 2)


def test_batches_retrace_only_when_num_graphs_changes():
    gsr = gsr_compile(model())
    gsr(batch_of(6, 9, 13))
    gsr(batch_of(7, 8, 20, seed=5))
    assert len(gsr._graphs) == 1
    assert gsr(batch_of(6, 9)).shape == (2, 2)
    assert len(gsr._graphs) == 2


def test_batches_from_a_data_loader_train():
    dataset = [graph(8 + i, 24 + 3 * i, seed=i, y=torch.tensor([float(i)]))
               for i in range(10)]
    gsr = gsr_compile(model(), example_inputs=(next(iter(DataLoader(dataset, batch_size=4))),))
    before = {n: p.detach().clone() for n, p in gsr.named_parameters()}
    optimizer = torch.optim.Adam(gsr.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        for batch in DataLoader(dataset, batch_size=4):
            loss = (gsr(batch)[:, 0] - batch.y.double()).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert len(gsr._graphs) == 2  # batches of 4, and the last of 2
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(not torch.equal(p, before[n]) for n, p in gsr.named_parameters())


# -- state ---------------------------------------------------------------------------------

def test_state_dict_round_trip():
    data = graph()
    gsr = gsr_compile(model(seed=0), example_inputs=(data,))
    gsr.eval()
    other = gsr_compile(model(seed=1), example_inputs=(data,))
    other.eval()
    assert not torch.equal(other(data), gsr(data))
    other.load_state_dict(gsr.state_dict())
    assert torch.equal(other(data), gsr(data))


def test_values_that_are_not_numbers_or_strings_may_ride_along_but_not_be_read():
    batch = batch_of(6, 9, smiles="C")  # collated to a list of strings
    assert isinstance(batch.smiles, list)
    gsr = gsr_compile(model())
    assert gsr(batch).shape == (2, 2)

    class ReadsSmiles(DataGNN):
        def forward(self, data):
            return self.decoder(self.encoder(data.x)) * len(data.smiles)

    torch.manual_seed(0)
    with pytest.raises(GSRCompileError, match="data.smiles is a list"):
        gsr_compile(ReadsSmiles().double())(batch)
