"""Link executors (controller/links.py) with real threads and real memory: chunked moves
arrive intact, concurrent moves share the link, a small move is not stuck behind a large one,
and a failing copier fails its moves only."""

import threading

import numpy as np
import pytest

from controller.links import HostCopier, Link

MiB = 1 << 20


def address(array: np.ndarray) -> int:
    return array.ctypes.data


@pytest.fixture
def link():
    link = Link("host→host", HostCopier(), bandwidth=5e9, chunk_bytes=MiB, batch_chunks=4)
    yield link
    link.close()


def test_a_chunked_move_arrives_intact(link):
    src = np.random.default_rng(1).integers(0, 256, 37 * MiB + 123, dtype=np.uint8)
    dst = np.zeros_like(src)
    move = link.move(address(dst), address(src), src.nbytes)
    np.testing.assert_array_equal(dst, src)
    assert move.service_s > 0 and move.wait_s >= 0
    assert link.bytes == src.nbytes and link.moves == 1 and link.queued == 0


def test_concurrent_moves_share_the_link_and_all_arrive(link):
    sources = [np.random.default_rng(i).integers(0, 256, (i + 1) * 3 * MiB, dtype=np.uint8) for i in range(8)]
    targets = [np.zeros_like(s) for s in sources]
    threads = [threading.Thread(target=link.move, args=(address(t), address(s), s.nbytes))
               for s, t in zip(sources, targets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for s, t in zip(sources, targets):
        np.testing.assert_array_equal(t, s)
    assert link.moves == 8 and link.bytes == sum(s.nbytes for s in sources)


def test_a_small_move_finishes_while_a_large_one_is_still_running(link):
    big_src = np.ones(768 * MiB, np.uint8)
    big_dst = np.zeros_like(big_src)
    big = link.submit(address(big_dst), address(big_src), big_src.nbytes)
    while link.bytes == 0:                 # the large move is under way
        big.done.wait(0.001)
    small_src = np.full(MiB, 7, np.uint8)
    small_dst = np.zeros_like(small_src)
    small = link.move(address(small_dst), address(small_src), MiB)
    assert not big.done.is_set()           # joined at a batch boundary, not after the large one
    assert (small_dst == 7).all()
    big.done.wait(60)
    assert big.transfer.finished_at > small.transfer.finished_at and (big_dst == 1).all()


def test_a_failing_copier_fails_its_moves_and_the_link_goes_on():
    class Flaky(HostCopier):
        fail = True

        def copy_batch(self, pieces):
            if self.fail:
                self.fail = False
                raise OSError("copy engine fault")
            super().copy_batch(pieces)

    link = Link("flaky", Flaky(), bandwidth=5e9, chunk_bytes=MiB, batch_chunks=4)
    try:
        src, dst = np.ones(2 * MiB, np.uint8), np.zeros(2 * MiB, np.uint8)
        with pytest.raises(OSError, match="copy engine fault"):
            link.move(address(dst), address(src), src.nbytes)
        link.move(address(dst), address(src), src.nbytes)
        assert (dst == 1).all() and link.queued == 0
    finally:
        link.close()


def test_an_empty_move_is_done_at_once(link):
    assert link.submit(0, 0, 0).done.is_set()
