"""plan_arena, SymbolicSize, ArenaPlanCache: correctness on random interval sets, optimality on
small cases (checked against an exhaustive search), symbolic sizes and the per-size cache."""
import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gsr_compiler.runtime.arena import (ORDERINGS, ArenaPlanCache, Buffer, LiveInterval,
                                        SymbolicSize, live_bytes_lower_bound, plan_arena)


def assert_no_overlap(plan, buffers):
    """Independent of ArenaPlan.check: every pair live at one step is disjoint in memory."""
    for a, b in itertools.combinations(buffers, 2):
        sa, sb = plan.sizes[a.name], plan.sizes[b.name]
        if sa == 0 or sb == 0 or not a.overlaps_in_time(b):
            continue
        oa, ob = plan.offsets[a.name], plan.offsets[b.name]
        assert oa + sa <= ob or ob + sb <= oa, (a, b, oa, ob)
    for buf in buffers:
        assert plan.offsets[buf.name] % plan.alignment == 0
        assert plan.offsets[buf.name] + plan.sizes[buf.name] <= plan.total_bytes


def brute_lower_bound(buffers):
    steps = range(min(b.first_use for b in buffers), max(b.last_use for b in buffers) + 1)
    return max(sum(b.size for b in buffers if b.first_use <= t <= b.last_use) for t in steps)


def optimal_arena_bytes(buffers):
    """Exact optimum by exhaustive search (alignment 1).

    Any optimal placement can be compacted downwards until every buffer sits at 0 or on top of a
    buffer live at the same time; placing buffers in order of offset, each one's offset is then 0
    or the end of an already placed, time-overlapping buffer. Searching those choices over all
    orders finds the optimum.
    """
    n = len(buffers)
    best = [sum(b.size for b in buffers)]

    def search(placed, last_offset, top):
        if top >= best[0]:
            return
        if len(placed) == n:
            best[0] = top
            return
        for i, b in enumerate(buffers):
            if i in placed:
                continue
            conflicts = [(placed[j], buffers[j]) for j in placed
                         if buffers[j].overlaps_in_time(b)]
            candidates = {0} | {o + c.size for o, c in conflicts}
            for off in sorted(candidates):
                if off < last_offset:
                    continue  # offsets are non-decreasing in placement order
                if all(off + b.size <= o or o + c.size <= off for o, c in conflicts):
                    placed[i] = off
                    search(placed, off, max(top, off + b.size))
                    del placed[i]

    search({}, 0, 0)
    return best[0]


def random_buffers(rnd, n, horizon, max_size, max_len):
    out = []
    for i in range(n):
        start = rnd.randrange(horizon)
        out.append(Buffer(f"t{i}", rnd.randint(1, max_size), start,
                          start + rnd.randrange(max_len)))
    return out


# ------------------------------------------------------------------------------------------
# Hand cases with a known optimum
# ------------------------------------------------------------------------------------------

HAND_CASES = [
    # (buffers, optimal bytes at alignment 1)
    ([Buffer("a", 100, 0, 0), Buffer("b", 70, 1, 1), Buffer("c", 30, 2, 2)], 100),
    ([Buffer("a", 10, 0, 3), Buffer("b", 20, 1, 2), Buffer("c", 30, 2, 3)], 60),
    # A chain a->b->c->d where each buffer overlaps only its neighbours: two slots suffice.
    ([Buffer("a", 40, 0, 1), Buffer("b", 40, 1, 2), Buffer("c", 40, 2, 3),
      Buffer("d", 40, 3, 4)], 80),
    # Reversible chain shape: a long-lived input, per-block temporaries that die immediately.
    ([Buffer("x", 64, 0, 9)] + [Buffer(f"f{i}", 32, i, i + 1) for i in range(9)], 128),
    # The small buffer must go on top of the big one, not in the middle, to let "late" fit.
    ([Buffer("big", 50, 0, 1), Buffer("small", 10, 1, 2), Buffer("late", 50, 2, 3)], 60),
    # Mixed sizes and staggered lifetimes (optimum from the exhaustive search).
    ([Buffer("a", 2, 0, 1), Buffer("b", 1, 0, 3), Buffer("c", 3, 0, 0), Buffer("d", 3, 2, 3),
      Buffer("e", 2, 1, 2)], None),
]


@pytest.mark.parametrize("case", range(len(HAND_CASES)))
def test_hand_cases_are_optimal(case):
    buffers, optimum = HAND_CASES[case]
    exact = optimal_arena_bytes(buffers)
    if optimum is not None:
        assert exact == optimum
    plan = plan_arena(buffers, alignment=1)
    assert_no_overlap(plan, buffers)
    assert plan.total_bytes == exact
    assert plan.lower_bound == brute_lower_bound(buffers) <= exact


def test_plan_on_empty_and_zero_sized_buffers():
    plan = plan_arena([])
    assert plan.total_bytes == 0 and plan.lower_bound == 0 and plan.gap_percent == 0.0
    plan = plan_arena([Buffer("z", 0, 0, 5), Buffer("a", 10, 0, 5)], alignment=8)
    assert plan.total_bytes == 16 and plan.lower_bound == 10
    plan.check()


def test_alignment_pads_offsets_not_the_lower_bound():
    bufs = [Buffer("a", 100, 0, 1), Buffer("b", 100, 0, 1)]
    plan = plan_arena(bufs, alignment=64)
    assert sorted(plan.offsets.values()) == [0, 128]
    assert plan.total_bytes == 256 and plan.lower_bound == 200
    assert plan.gap_percent == pytest.approx(28.0)


def test_invalid_inputs():
    with pytest.raises(ValueError, match="unique"):
        plan_arena([Buffer("a", 1, 0, 1), Buffer("a", 1, 2, 3)])
    with pytest.raises(ValueError, match="last_use"):
        Buffer("a", 1, 3, 2)
    with pytest.raises(ValueError, match="alignment"):
        plan_arena([Buffer("a", 1, 0, 1)], alignment=48)
    with pytest.raises(ValueError, match="unknown orderings"):
        plan_arena([Buffer("a", 1, 0, 1)], orderings=["nope"])
    with pytest.raises(ValueError, match="symbolic"):
        plan_arena([Buffer("a", SymbolicSize(per_node=4), 0, 1)])


def test_plan_str_reports_bound_and_gap():
    bufs = [Buffer("input", 4096, 0, 3), Buffer("hidden", 8192, 1, 2), Buffer("out", 4096, 3, 4)]
    plan = plan_arena(bufs)
    text = str(plan)
    assert "lower bound" in text and "gap" in text and "best ordering" in text
    for name in ("input", "hidden", "out"):
        assert name in text
    assert plan.total_bytes == plan.lower_bound == 12288 and plan.gap_percent == 0.0


# ------------------------------------------------------------------------------------------
# Random interval sets
# ------------------------------------------------------------------------------------------

intervals = st.lists(
    st.tuples(st.integers(0, 1 << 16), st.integers(0, 30), st.integers(0, 12)),
    min_size=0, max_size=40)


@settings(max_examples=150, deadline=None)
@given(intervals, st.sampled_from([1, 8, 64, 256]))
def test_random_plans_are_valid(spec, alignment):
    buffers = [Buffer(f"b{i}", size, start, start + length)
               for i, (size, start, length) in enumerate(spec)]
    plan = plan_arena(buffers, alignment=alignment)
    plan.check()
    assert_no_overlap(plan, buffers)
    if buffers:
        assert plan.lower_bound == brute_lower_bound(buffers)
    assert plan.total_bytes >= plan.lower_bound
    # Never worse than giving every buffer its own (aligned) bytes.
    assert plan.total_bytes <= sum(-(-b.size // alignment) * alignment for b in buffers)


def test_random_plans_are_close_to_the_lower_bound():
    rnd = random.Random(1234)
    gaps = []
    for trial in range(30):
        buffers = random_buffers(rnd, n=rnd.randint(50, 300), horizon=200,
                                 max_size=1 << rnd.randint(10, 20), max_len=30)
        plan = plan_arena(buffers)
        plan.check()
        assert plan.total_bytes >= plan.lower_bound
        gaps.append(plan.gap_percent)
    # Greedy best fit has no worst-case guarantee; on random sets it stays close to the bound.
    assert max(gaps) < 25.0, gaps
    assert sum(gaps) / len(gaps) < 10.0, gaps


def test_random_small_sets_match_the_exhaustive_optimum_mostly():
    rnd = random.Random(99)
    optimal = 0
    trials = 60
    for _ in range(trials):
        buffers = random_buffers(rnd, n=rnd.randint(2, 5), horizon=6, max_size=10, max_len=4)
        exact = optimal_arena_bytes(buffers)
        plan = plan_arena(buffers, alignment=1)
        assert_no_overlap(plan, buffers)
        assert brute_lower_bound(buffers) <= exact <= plan.total_bytes
        assert plan.total_bytes <= 1.5 * exact
        optimal += plan.total_bytes == exact
    assert optimal >= 0.9 * trials


def test_every_ordering_is_valid_and_the_best_is_kept():
    rnd = random.Random(5)
    buffers = random_buffers(rnd, n=120, horizon=80, max_size=5000, max_len=20)
    plan = plan_arena(buffers, alignment=16)
    for name in ORDERINGS:
        single = plan_arena(buffers, alignment=16, orderings=[name])
        single.check()
        assert plan.total_bytes <= single.total_bytes
    assert min(plan.candidates.values()) >= plan.total_bytes


def test_lower_bound_counts_inclusive_intervals():
    # Ends at 3 and starts at 3 overlap; ends at 3 and starts at 4 do not.
    assert live_bytes_lower_bound([5, 7], [0, 3], [3, 6]) == 12
    assert live_bytes_lower_bound([5, 7], [0, 4], [3, 6]) == 7


def test_planning_large_sets_is_fast():
    import time
    rnd = random.Random(0)
    buffers = random_buffers(rnd, n=3000, horizon=3000, max_size=1 << 20, max_len=40)
    start = time.perf_counter()
    plan = plan_arena(buffers)
    assert time.perf_counter() - start < 20.0
    plan.check()


# ------------------------------------------------------------------------------------------
# Symbolic sizes and the per-size cache
# ------------------------------------------------------------------------------------------


def test_symbolic_size_arithmetic():
    act = SymbolicSize(per_node=512)
    edges = SymbolicSize(per_edge=8, const=16)
    total = act + edges * 2 + 4
    assert total == SymbolicSize(const=36, per_node=512, per_edge=16)
    assert total.evaluate(N=10, E=3) == 36 + 5120 + 48
    assert str(total) == "512*N + 16*E + 36"
    assert str(SymbolicSize()) == "0"
    assert 3 * act == SymbolicSize(per_node=1536)
    with pytest.raises(ValueError):
        SymbolicSize(const=-100, per_node=1).evaluate(10, 0)
    with pytest.raises(TypeError):
        SymbolicSize(per_node=1.5)


def _symbolic_chain():
    # A reversible-chain-like program: input [N, 128] f32 alive throughout, compressed top-k
    # per block, message buffers per edge.
    bufs = [LiveInterval("x", SymbolicSize(per_node=512), 0, 20)]
    for i in range(8):
        s = 2 * i + 1
        bufs.append(LiveInterval(f"norm{i}", SymbolicSize(per_node=512), s, s + 1))
        bufs.append(LiveInterval(f"topk{i}", SymbolicSize(per_node=160), s + 1, s + 2))
        bufs.append(LiveInterval(f"msg{i}", SymbolicSize(per_edge=64, const=256), s + 1, s + 2))
    return bufs


def test_symbolic_plan_evaluates_sizes_per_input():
    bufs = _symbolic_chain()
    small = plan_arena(bufs, num_nodes=100, num_edges=300)
    large = plan_arena(bufs, num_nodes=1000, num_edges=3000)
    small.check()
    large.check()
    assert small.sizes["x"] == 51200 and large.sizes["msg3"] == 64 * 3000 + 256
    assert large.total_bytes > small.total_bytes
    assert large.num_nodes == 1000 and "N=1000" in str(large)
    # Exactly at the lower bound up to alignment padding.
    assert large.gap_percent < 1.0


def test_plan_cache_is_lru_keyed_by_graph_size():
    cache = ArenaPlanCache(_symbolic_chain(), max_entries=2)
    a = cache.plan(100, 300)
    assert cache.plan(100, 300) is a and (cache.hits, cache.misses) == (1, 1)
    b = cache.plan(200, 300)
    assert b.total_bytes > a.total_bytes
    cache.plan(100, 300)             # refresh (100, 300)
    cache.plan(300, 900)             # evicts (200, 300), the least recently used
    assert cache.cached_sizes() == [(100, 300), (300, 900)]
    assert cache.plan(200, 300) is not b
    assert cache.misses == 4 and len(cache) == 2
