"""Real deep GNNs, as written, through gsr_compile (issue 16).

Each corpus model (tests/corpus/models/, one per public source) is checked at depth 16:
it compiles as written; it trains; eval mode and a state_dict round trip work; what it does
(converts / unchanged) is what EXPECTED says; where a chain converts, float64 gradients equal
the store-everything reference to 1e-9; and autograd never keeps more than the eager model,
and at least 2x less where a chain converts.

FAILS_TODAY lists the checks that fail on the current compiler, each with the issue item that
fixes it; strict xfail, so a fix that lands makes the test fail until its entry is removed.
`python -m tests.corpus.outcomes` prints what each model does today.
"""
from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

from gsr_compiler import gsr_compile
from gsr_compiler.memory import saved_bytes_of_step

from .corpus import CORPUS, EXPECTED, build, float_tensors, scalar_loss

CONVERTING = [name for name in CORPUS if EXPECTED[name] == "converts"]

DATA_INPUT = "not in issue 16's list: a forward taking one PyG Data object is refused"
SPARSE_SAVED = ("not in issue 16's list (near item 8): saved_bytes_of_step cannot count a torch "
                "sparse CSR tensor autograd saves")

# ---------------------------------------------------------------------------------------------
# Checks that fail on the current code, (model, check) -> why. Shrink this as fixes land.
# ---------------------------------------------------------------------------------------------
FAILS_TODAY: dict[tuple[str, str], str] = {}
for _check in ("compiles", "trains", "eval_and_state_dict", "gradients", "saved_bytes"):
    FAILS_TODAY.update({
        ("deepgcn_proteins", _check): "issue 16 item 1: DeepGCNLayer ckpt_grad branches on "
                                      "requires_grad, reported as data-dependent control flow",
        ("rev_gnn", _check): "issue 16 item 5: GroupAddRev is traced into and fails (LayerNorm "
                             "of one group gets the full width) instead of being left alone",
        ("graph_gps", _check): "issue 16 item 2: GPSConv is traced into and aborts the compile",
        ("egc", _check): "issue 16 item 2: AtomEncoder loop over x.shape[1] aborts the compile",
        ("mem_pool", _check): "issue 16 item 2: tracing into MemPooling aborts the compile "
                              "(control flow on a traced value)",
        ("pcqm4m_gin", _check): DATA_INPUT,
        ("resgen_molhiv", _check): DATA_INPUT,
        ("deepgcn_ppi", _check): DATA_INPUT,
    })
FAILS_TODAY.update({
    ("gcn2_ppi", "compiles"): "issue 16 item 4: no width rule for GCN2Conv (left unchanged)",
    ("gcn2_ppi", "gradients"): "issue 16 item 4: no width rule for GCN2Conv (left unchanged)",
    ("gcn2_ppi", "saved_bytes"): SPARSE_SAVED + "; then issue 16 item 4 (not converted)",
    ("gcn2_cora", "saved_bytes"): SPARSE_SAVED,
    ("resgen_arxiv", "compiles"): "issue 16 item 4: 'no width rule for GENConv' for the "
                                  "user's own GENConv class",
    ("resgen_arxiv", "gradients"): "issue 16 item 4: the user's GENConv is not converted",
    ("resgen_arxiv", "saved_bytes"): "issue 16 item 3: the user's torch.utils.checkpoint is "
                                     "removed by tracing (3.9x eager's saved bytes)",
})
# ---------------------------------------------------------------------------------------------


def cases(check: str, names=CORPUS):
    params = []
    for name in names:
        why = FAILS_TODAY.get((name, check))
        marks = [pytest.mark.xfail(strict=True, reason=why)] if why else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PyG's sparse-CSR beta notices
        yield


def compiled(name: str, seed: int = 0, dtype=torch.float32):
    model, inputs = build(name, seed=seed, dtype=dtype)
    return model, gsr_compile(model, example_inputs=inputs), inputs


def seeded_call(module, inputs, seed: int = 123):
    torch.manual_seed(seed)  # mem_pool's F.dropout is on in eval mode too, as written
    return module(*inputs)


def assert_same_outputs(a, b, **tol):
    ta, tb = float_tensors(a), float_tensors(b)
    assert len(ta) == len(tb) > 0
    for x, y in zip(ta, tb):
        torch.testing.assert_close(x, y, **tol)


def user_keys(state: dict) -> dict:
    """The compiled model's state with the eager model's key names."""
    return {k.removeprefix("compiled."): v for k, v in state.items()}


@pytest.mark.parametrize("name", cases("compiles"))
def test_compiles_as_written_and_does_what_is_expected(name):
    model, gsr, inputs = compiled(name)
    explain = gsr.explain()
    outcome = "converts" if gsr.report.chains else "unchanged"
    assert outcome == EXPECTED[name], explain
    eager_out, out = seeded_call(model, inputs), seeded_call(gsr, inputs)
    assert [t.shape for t in float_tensors(out)] == [t.shape for t in float_tensors(eager_out)]
    if outcome == "unchanged":  # then it must compute exactly what the model as written does
        assert_same_outputs(out, eager_out)
        model.eval(), gsr.eval()
        assert_same_outputs(seeded_call(gsr, inputs), seeded_call(model, inputs))


@pytest.mark.parametrize("name", cases("trains"))
def test_trains(name):
    _, gsr, inputs = compiled(name)
    before = {n: p.detach().clone() for n, p in gsr.named_parameters()}
    optimizer = torch.optim.Adam(gsr.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = scalar_loss(gsr(*inputs))
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert all(math.isfinite(v) for v in losses), losses
    moved = [n for n, p in gsr.named_parameters() if not torch.equal(p, before[n])]
    assert moved, "no parameter changed in 3 optimizer steps"


@pytest.mark.parametrize("name", cases("eval_and_state_dict"))
def test_eval_and_state_dict_round_trip(name):
    _, gsr, inputs = compiled(name)
    optimizer = torch.optim.SGD(gsr.parameters(), lr=1e-2)
    scalar_loss(gsr(*inputs)).backward()  # one step, so the state is not the initial one
    optimizer.step()

    gsr.eval()
    with torch.no_grad():
        out = seeded_call(gsr, inputs)
        assert_same_outputs(seeded_call(gsr, inputs), out)  # eval is deterministic

    buffer = io.BytesIO()
    torch.save(gsr.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)

    _, fresh, _ = compiled(name, seed=1)  # other initial weights
    fresh.load_state_dict(state)
    fresh.eval()
    with torch.no_grad():
        assert_same_outputs(seeded_call(fresh, inputs), out)

    if EXPECTED[name] == "unchanged":  # the state also loads into the model as written
        eager, _ = build(name, seed=2)
        eager.load_state_dict(user_keys(state))
        eager.eval()
        with torch.no_grad():
            assert_same_outputs(seeded_call(eager, inputs), out)


@pytest.mark.parametrize("name", cases("gradients", CONVERTING))
def test_float64_gradients_equal_store_everything(name):
    _, gsr, inputs = compiled(name, dtype=torch.float64)
    assert gsr.report.chains, gsr.explain()
    check = gsr.verify_gradients(inputs, loss_fn=scalar_loss, tolerance=1e-9)
    assert check.errors, "no gradient was compared"
    assert check.ok, str(check)


@pytest.mark.parametrize("name", cases("saved_bytes"))
def test_saved_bytes_never_above_eager_and_halved_where_converted(name):
    model, gsr, inputs = compiled(name)

    def loss(output, _target):
        return scalar_loss(output)

    eager_bytes = saved_bytes_of_step(model, inputs, None, loss)
    compiled_bytes = saved_bytes_of_step(gsr, inputs, None, loss)
    assert compiled_bytes <= eager_bytes, (compiled_bytes, eager_bytes, gsr.explain())
    if gsr.report.chains or EXPECTED[name] == "converts":
        assert 2 * compiled_bytes <= eager_bytes, (compiled_bytes, eager_bytes, gsr.explain())
