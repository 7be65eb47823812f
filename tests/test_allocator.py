"""RangeAllocator and Pool: alignment, best fit, coalescing, fragmentation, growth, release."""

import random

import pytest

from controller.allocator import ALIGNMENT, RangeAllocator, align_up
from controller.pool import Pool
from faastube.errors import PoolExhaustedError


def test_regions_are_aligned_and_disjoint():
    alloc = RangeAllocator(1 << 20)
    regions = []
    for size in (1, 255, 256, 257, 1000, 4096, 3):
        offset = alloc.allocate(size)
        assert offset % ALIGNMENT == 0
        regions.append((offset, align_up(size)))
    regions.sort()
    for (a, size_a), (b, _) in zip(regions, regions[1:]):
        assert a + size_a <= b
    assert alloc.used == sum(size for _, size in regions)


def test_zero_byte_objects_still_get_a_distinct_region():
    alloc = RangeAllocator(4096)
    assert alloc.allocate(0) != alloc.allocate(0)


def test_freeing_everything_coalesces_into_one_block():
    alloc = RangeAllocator(1 << 20)
    offsets = [(alloc.allocate(1000), 1000) for _ in range(500)]
    random.Random(7).shuffle(offsets)
    for offset, size in offsets:
        alloc.free(offset, size)
    assert alloc.free_blocks == 1
    assert alloc.largest_free == 1 << 20
    assert alloc.empty


def test_fragmentation_holes_merge_when_neighbours_free():
    alloc = RangeAllocator(64 * 1024)
    offsets = [alloc.allocate(1024) for _ in range(64)]
    assert alloc.allocate(1) is None                     # full
    for offset in offsets[::2]:                          # free every other block
        alloc.free(offset, 1024)
    assert alloc.largest_free == 1024                    # 32 holes of 1 KiB
    assert alloc.allocate(2048) is None                  # fragmented: no 2 KiB hole
    for offset in offsets[1::2][:8]:                     # free the first 8 remaining
        alloc.free(offset, 1024)
    assert alloc.largest_free == 17 * 1024               # blocks 0..16 merged into one
    assert alloc.allocate(17 * 1024) == 0


def test_best_fit_keeps_the_large_hole():
    alloc = RangeAllocator(16 * 1024)
    a = alloc.allocate(1024)
    alloc.allocate(1024)
    alloc.free(a, 1024)                                  # 1 KiB hole at 0, 14 KiB at the end
    assert alloc.allocate(512) == 0                      # goes into the small hole
    assert alloc.largest_free == 14 * 1024


def test_double_free_is_refused():
    alloc = RangeAllocator(4096)
    offset = alloc.allocate(100)
    alloc.free(offset, 100)
    with pytest.raises(ValueError, match="double free"):
        alloc.free(offset, 100)


def test_random_workload_never_overlaps():
    rng = random.Random(1)
    alloc = RangeAllocator(1 << 22)
    live = {}
    for _ in range(5000):
        if live and rng.random() < 0.45:
            offset = rng.choice(list(live))
            alloc.free(offset, live.pop(offset))
        else:
            size = rng.randint(1, 40_000)
            offset = alloc.allocate(size)
            if offset is not None:
                live[offset] = size
        spans = sorted((o, o + align_up(s)) for o, s in live.items())
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
        assert alloc.used == sum(align_up(s) for s in live.values())


def test_pool_grows_by_slabs_up_to_its_limit_and_says_why_it_cannot():
    pool = Pool("host", slab_size=1 << 20, limit=3 << 20, idle_release_s=60)
    regions = [pool.allocate("ns", 600 * 1024) for _ in range(3)]
    assert len(pool.slabs) == 3
    with pytest.raises(PoolExhaustedError, match=r"cannot hold 600\.0 KiB for namespace 'ns'.*"
                                                 r"3\.0 MiB limit.*--pool-limit"):
        pool.allocate("ns", 600 * 1024)
    assert all(r.slab.id in pool.slabs for r in regions)  # nothing else disturbed
    pool.close()


def test_pool_keeps_namespaces_in_separate_slabs():
    pool = Pool("host", slab_size=1 << 20, limit=8 << 20, idle_release_s=60)
    a = pool.allocate("a", 100)
    b = pool.allocate("b", 100)
    assert a.slab is not b.slab
    assert pool.allocate("a", 100).slab is a.slab
    pool.close()


def test_large_objects_get_a_slab_of_their_own():
    pool = Pool("host", slab_size=1 << 20, limit=16 << 20, idle_release_s=60)
    region = pool.allocate("ns", 5 << 20)
    assert region.slab.size >= 5 << 20
    pool.close()


def test_empty_slabs_are_retired_after_the_idle_time_and_under_pressure():
    retired = []
    pool = Pool("host", slab_size=1 << 20, limit=2 << 20, idle_release_s=10, on_retire=retired.append)
    a = pool.allocate("a", 1000)
    pool.free(a)
    start = a.slab.empty_since
    assert pool.retire_idle(now=start + 5) == []
    assert pool.retire_idle(now=start + 10) == [a.slab] == retired
    b1 = pool.allocate("b", 1 << 20)
    pool.free(b1)                                        # empty, not idle long
    pool.allocate("c", 1 << 20)
    pool.allocate("c", 1 << 20)                          # needs b's empty slab's room
    assert b1.slab in retired
    assert b1.slab.retired
    pool.close()
