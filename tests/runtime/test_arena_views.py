"""Arena and ArenaCache: typed views at planned offsets, bounds and alignment checks, no overlap
between views of buffers live at the same step, reuse of one allocation across input sizes."""
import random

import pytest
import torch

from gsr_compiler.runtime.arena import (Arena, ArenaCache, ArenaPlan, Buffer, SymbolicSize,
                                        plan_arena)

DTYPES = [torch.float32, torch.float16, torch.int64, torch.uint8, torch.float64]


def test_views_of_simultaneously_live_buffers_do_not_overlap():
    rnd = random.Random(3)
    buffers, specs = [], {}
    for i in range(60):
        dtype = rnd.choice(DTYPES)
        shape = (rnd.randint(1, 9), rnd.randint(1, 17))
        nbytes = shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()
        start = rnd.randrange(40)
        buffers.append(Buffer(f"t{i}", nbytes, start, start + rnd.randrange(8)))
        specs[f"t{i}"] = (shape, dtype)
    plan = plan_arena(buffers)
    arena = Arena(plan)
    assert arena.storage.numel() == plan.total_bytes < plan.unplanned_bytes
    for step in range(50):
        live = [b for b in buffers if b.first_use <= step <= b.last_use]
        views = arena.views({b.name: specs[b.name] for b in live})
        # Fill each live buffer with its own id, then check nobody overwrote anybody.
        for i, b in enumerate(live):
            views[b.name].fill_(i % 100 + 1)
        for i, b in enumerate(live):
            assert bool((views[b.name] == i % 100 + 1).all()), (step, b.name)
            assert arena.owns(views[b.name])


def test_view_checks_name_size_and_alignment():
    plan = plan_arena([Buffer("a", 64, 0, 1), Buffer("b", 10, 0, 1), Buffer("c", 8, 2, 3)],
                      alignment=8)
    arena = Arena(plan)
    a = arena.view("a", (4, 4), torch.float32)
    assert a.shape == (4, 4) and a.dtype == torch.float32 and a.is_contiguous()
    assert a.data_ptr() == arena.storage.data_ptr() + plan.offsets["a"]
    assert arena.view("b", 5, torch.float16).shape == (5,)
    assert arena.view("b", (0,), torch.float64).numel() == 0
    with pytest.raises(KeyError):
        arena.view("nope", (1,), torch.float32)
    with pytest.raises(ValueError, match="planned"):
        arena.view("a", (17,), torch.float32)
    with pytest.raises(ValueError, match="planned"):
        arena.view("b", (2,), torch.float64)
    # An offset that suits bytes but not the dtype is refused.
    odd = ArenaPlan(offsets={"x": 0, "y": 3}, sizes={"x": 3, "y": 8},
                    intervals={"x": (0, 0), "y": (0, 0)}, total_bytes=11, lower_bound=11,
                    alignment=1)
    odd.check()
    assert Arena(odd).view("y", (8,), torch.uint8).numel() == 8
    with pytest.raises(ValueError, match="aligned"):
        Arena(odd).view("y", (1,), torch.float64)


def test_storage_too_small_is_rejected():
    plan = plan_arena([Buffer("a", 128, 0, 1)])
    with pytest.raises(ValueError, match="needs"):
        Arena(plan, storage=torch.empty(64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        Arena(plan, storage=torch.empty(128, dtype=torch.float32))


def test_arena_cache_replans_per_size_and_reuses_one_allocation():
    bufs = [Buffer("x", SymbolicSize(per_node=16), 0, 3),
            Buffer("m", SymbolicSize(per_edge=8), 1, 2),
            Buffer("y", SymbolicSize(per_node=16), 3, 4)]
    cache = ArenaCache(bufs, max_entries=4)
    big = cache.arena(100, 400)
    assert big.nbytes == big.plan.total_bytes >= 16 * 100 + 8 * 400
    x = big.view("x", (100, 4), torch.float32)
    assert cache.allocations == 1
    small = cache.arena(10, 40)                 # fits: same storage, new plan
    assert cache.allocations == 1 and small.storage is big.storage
    assert small.plan.sizes["x"] == 160
    with pytest.raises(ValueError):
        small.view("x", (100, 4), torch.float32)   # the small plan knows the small size
    assert small.view("x", (10, 4), torch.float32).data_ptr() == x.data_ptr() - \
        big.plan.offsets["x"] + small.plan.offsets["x"]
    cache.arena(1000, 4000)                     # grows
    assert cache.allocations == 2 and cache.reserved_bytes >= 16 * 1000 + 8 * 4000
    cache.arena(100, 400)                       # cached plan, storage big enough
    assert cache.allocations == 2 and cache.plans.hits == 1
    cache.release()
    assert cache.reserved_bytes == 0
