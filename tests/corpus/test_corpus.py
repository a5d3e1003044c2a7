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

# ---------------------------------------------------------------------------------------------
# Checks that fail on the current code, (model, check) -> why. Shrink this as fixes land.
# ---------------------------------------------------------------------------------------------
FAILS_TODAY: dict[tuple[str, str], str] = {
    ("resgen_arxiv", "deep_float32"):
        "with 2 threads the backward's gradients of blocks 122-166 are up to 1e-2 off (float32's "
        "own error there: 2e-4), also with an anchor at every block (rebuild error 2e-7): not "
        "drift; the recompute differs from the forward there, not yet explained. Passes with 1 "
        "thread. docs/exactness.md, Known gap",
}
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
    # one small step, so the state is not the initial one (at lr 1e-2 the summed-pooling
    # models, pcqm4m_gin, step to NaN weights, eager as much as compiled)
    optimizer = torch.optim.SGD(gsr.parameters(), lr=1e-4)
    scalar_loss(gsr(*inputs)).backward()
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


# ---------------------------------------------------------------------------------------------
# At depth, in float32: as exact as storing everything in float32 is.
# ---------------------------------------------------------------------------------------------
DEEP, DEEP_WIDTH = 256, 16

def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def two_threads():
    """Rounding depends on the thread count: the deep checks run with 2, as CI's machine does."""
    yield from _threads(2)


@pytest.fixture
def one_thread():
    yield from _threads(1)


# The model as written overflows before 256 blocks (its loss is inf at 128), so no gradient of
# it, stored or rebuilt, means anything there: test_diverges_as_written checks it still does.
DIVERGES_AS_WRITTEN = {"gcn2_ppi"}


@pytest.mark.parametrize("name", cases("deep_float32", [n for n in CONVERTING
                                                        if n not in DIVERGES_AS_WRITTEN]))
def test_float32_gradients_at_256_blocks_as_exact_as_storing_everything(name, two_threads):
    """The first step, with ``drift_tolerance=1e-5``: every gradient is within 1e-3 of the
    float64 store-everything run, or within twice the error storing everything in float32 has
    (the deep corpus models are ill-conditioned enough that float32 autograd itself is 1e-2 to
    1 off on some gradients: reference.py). With the default 1e-3, resgen_arxiv, egc, mem_pool
    and pcqm4m_gin fail this (docs/exactness.md)."""
    model, inputs = build(name, depth=DEEP, width=DEEP_WIDTH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rebuild errors above 1e-5 are warned about
        gsr = gsr_compile(model, example_inputs=inputs, drift_tolerance=1e-5)
    assert gsr.report.chains, gsr.explain()
    check = gsr.verify_gradients(inputs, loss_fn=scalar_loss, tolerance=1e-3, against="float64")
    assert check.errors, "no gradient was compared"
    assert check.ok, str(check)


def test_the_deep_check_fails_without_anchors():
    """What makes the check above pass is the guard: without anchors, EGC's rebuilt chain input
    drifts and its first layers' gradients leave float32's own error far behind."""
    model, inputs = build("egc", depth=DEEP, width=DEEP_WIDTH)
    gsr = gsr_compile(model, example_inputs=inputs, anchors=None, drift_tolerance=1e-5)
    check = gsr.verify_gradients(inputs, loss_fn=scalar_loss, tolerance=1e-3, against="float64")
    assert not check.ok and len(check.failing) > 5, str(check)


@pytest.mark.parametrize("name", sorted(DIVERGES_AS_WRITTEN))
def test_diverges_as_written(name):
    model, inputs = build(name, depth=DEEP, width=DEEP_WIDTH)
    with torch.no_grad():
        out = model(*inputs)
    assert not all(bool(torch.isfinite(t).all()) for t in float_tensors(out))


def test_drift_prediction_is_calibrated_by_what_the_backward_measured(one_thread):
    """ResGEN's two-stream chain rebuilds its input with more error than the growth of its
    state predicts (with 1 thread: 13.9x at the input; with 2 threads it can differ):
    the backward measures it, and the next forward predicts with the measured ratio, keeps
    more anchors and brings the rebuild error under its target."""
    from gsr_compiler.runtime.drift import ANCHOR_SHARE
    from gsr_compiler.runtime.reversible import ReversibleChain

    model, inputs = build("resgen_arxiv", depth=DEEP, width=DEEP_WIDTH)
    gsr = gsr_compile(model, example_inputs=inputs)
    chain = next(m for m in gsr.modules() if isinstance(m, ReversibleChain))
    scalar_loss(gsr(*inputs)).backward()
    first = chain.last_precision
    ratio = max(first.errors[i] / first.predicted[i] for i in first.errors)
    assert ratio > 1.5, first.summary()  # under-predicted
    assert chain._drift_scale == pytest.approx(ratio)
    scalar_loss(gsr(*inputs)).backward()
    second = chain.last_precision
    assert second.calibration == pytest.approx(ratio)
    assert len(second.anchors) > len(first.anchors), (first.summary(), second.summary())
    assert second.worst_error <= 2 * chain.drift_tolerance * ANCHOR_SHARE, second.summary()
