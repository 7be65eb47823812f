"""Link executors (controller/links.py) with real threads and real memory: chunked moves
arrive intact, concurrent moves share the link (their callers take turns driving it), a
small move is not stuck behind a large one (and one no larger than a chunk is issued at once:
Note [Express moves]), and a failing copier fails its moves only."""

import threading
import time

import numpy as np
import pytest

from controller.links import LAST_BATCH_SPIN_S, HostCopier, Link

MiB = 1 << 20


def address(array: np.ndarray) -> int:
    return array.ctypes.data


def move_at_once(link: Link, sources: list[np.ndarray]) -> None:
    """Move every source into a fresh target, one thread each, all at once; each arrives intact."""
    targets = [np.zeros_like(s) for s in sources]
    threads = [threading.Thread(target=link.move, args=(address(t), address(s), s.nbytes))
               for s, t in zip(sources, targets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for s, t in zip(sources, targets):
        np.testing.assert_array_equal(t, s)


@pytest.fixture
def link():
    return Link("host→host", HostCopier(), bandwidth=5e9, chunk_bytes=MiB, batch_chunks=4)


def test_a_chunked_move_arrives_intact(link):
    src = np.random.default_rng(1).integers(0, 256, 37 * MiB + 123, dtype=np.uint8)
    dst = np.zeros_like(src)
    move = link.move(address(dst), address(src), src.nbytes)
    np.testing.assert_array_equal(dst, src)
    assert move.service_s > 0 and move.wait_s >= 0
    assert link.bytes == src.nbytes and link.moves == 1 and link.queued == 0


def test_concurrent_moves_share_the_link_and_all_arrive(link):
    sources = [np.random.default_rng(i).integers(0, 256, (i + 1) * 3 * MiB, dtype=np.uint8) for i in range(8)]
    move_at_once(link, sources)
    assert link.moves == 8 and link.bytes == sum(s.nbytes for s in sources)
    assert link.queued == 0 and link.stats()["wait_s"] > 0     # someone waited for a turn


@pytest.mark.slow
def test_a_small_move_finishes_while_a_large_one_is_still_running(link):
    big_src = np.ones(768 * MiB, np.uint8)
    big_dst = np.zeros_like(big_src)
    big = []
    runner = threading.Thread(target=lambda: big.append(
        link.move(address(big_dst), address(big_src), big_src.nbytes)))
    runner.start()
    deadline = time.monotonic() + 60
    while link.bytes == 0 and time.monotonic() < deadline:    # the large move is under way
        time.sleep(0.001)
    small_src = np.full(MiB, 7, np.uint8)
    small_dst = np.zeros_like(small_src)
    small = link.move(address(small_dst), address(small_src), MiB)
    assert link.bytes < big_src.nbytes     # joined at a batch boundary, not after the large one
    assert (small_dst == 7).all()
    runner.join(60)
    assert big[0].transfer.finished_at > small.transfer.finished_at and (big_dst == 1).all()


def test_a_failing_copier_fails_its_moves_and_the_link_goes_on():
    class Flaky(HostCopier):
        fail = True

        def issue(self, pieces):
            if self.fail:
                self.fail = False
                raise OSError("copy engine fault")
            super().issue(pieces)

    link = Link("flaky", Flaky(), bandwidth=5e9, chunk_bytes=MiB, batch_chunks=4)
    src, dst = np.ones(2 * MiB, np.uint8), np.zeros(2 * MiB, np.uint8)
    with pytest.raises(OSError, match="copy engine fault"):
        link.move(address(dst), address(src), src.nbytes)
    link.move(address(dst), address(src), src.nbytes)
    assert (dst == 1).all() and link.queued == 0


def test_an_empty_move_is_done_at_once(link):
    assert link.move(0, 0, 0).transfer.finished_at is not None and link.bytes == 0


class Queued:
    """A copier that, like a GPU stream, returns at issue and copies later, in order; waiting
    for a token that already arrived returns at once, as for a completed CUDA event."""

    def __init__(self):
        self.pending = []
        self.arrived = set()
        self.most = 0
        self.lock = threading.Lock()

    def issue(self, pieces):
        with self.lock:
            token = object()
            self.pending.append((token, pieces))
            self.most = max(self.most, len(self.pending))
            return token

    def wait(self, token, spin_s=0.0):
        with self.lock:
            while token not in self.arrived:      # in order, up to and including ``token``
                if not self.pending:
                    raise AssertionError("waited for a batch that was never issued")
                done, pieces = self.pending.pop(0)
                HostCopier.issue(pieces)
                self.arrived.add(done)


def test_queued_batches_stay_within_depth_and_arrive_in_order():
    copier = Queued()
    link = Link("queued", copier, bandwidth=5e9, chunk_bytes=MiB, batch_chunks=2, depth=3)
    sources = [np.random.default_rng(i).integers(0, 256, 5 * MiB + i, dtype=np.uint8) for i in range(4)]
    move_at_once(link, sources)
    assert 2 <= copier.most <= 3 and link.moves == 4 and link.queued == 0


def test_the_leader_spins_only_for_the_batch_that_ends_its_own_move():
    class Spins(Queued):
        def __init__(self):
            super().__init__()
            self.spins = []

        def wait(self, token, spin_s=0.0):
            self.spins.append(spin_s)
            super().wait(token, spin_s)

    copier = Spins()
    link = Link("spins", copier, bandwidth=5e9, chunk_bytes=MiB, batch_chunks=2, depth=2)
    src = np.random.default_rng(5).integers(0, 256, 5 * MiB, dtype=np.uint8)
    dst = np.zeros_like(src)
    link.move(address(dst), address(src), src.nbytes)        # batches of 2, 2 and 1 chunks
    np.testing.assert_array_equal(dst, src)
    assert copier.spins[:-1] == [0.0, 0.0]
    # The last batch (1 MiB at 5 GB/s: 0.2 ms on the link) is spun for about twice that.
    assert 2 * MiB / 5e9 < copier.spins[-1] <= LAST_BATCH_SPIN_S


def test_a_move_of_one_chunk_is_issued_at_once_behind_at_most_depth_batches():
    class Watching(Queued):
        ahead = None

        def issue(self, pieces):
            if pieces[0][2] == 100_000:                 # the small move
                self.ahead = len(self.pending)
                started.set()
            return super().issue(pieces)

    copier = Watching()
    link = Link("queued", copier, bandwidth=5e9, chunk_bytes=MiB, batch_chunks=1, depth=2)
    big_src = np.random.default_rng(3).integers(0, 256, 64 * MiB, dtype=np.uint8)
    big_dst = np.zeros_like(big_src)
    started = threading.Event()
    runner = threading.Thread(target=link.move, args=(address(big_dst), address(big_src), big_src.nbytes))
    runner.start()
    deadline = time.monotonic() + 60
    while not copier.pending and time.monotonic() < deadline:   # the large move is queued
        time.sleep(0.0005)
    small_src = np.full(100_000, 9, np.uint8)
    small_dst = np.zeros_like(small_src)
    small = link.move(address(small_dst), address(small_src), small_src.nbytes)
    runner.join(60)
    assert started.is_set() and copier.ahead <= 2 and (small_dst == 9).all()
    np.testing.assert_array_equal(big_dst, big_src)
    assert small.wait_s >= 0 and small.service_s > 0
    assert link.moves == 2 and link.bytes == big_src.nbytes + small_src.nbytes and link.queued == 0


def test_one_express_move_at_a_time_the_next_goes_through_the_scheduler():
    class Gated(HostCopier):
        """Copies at issue; the first token is reported done only when the gate opens."""
        def __init__(self):
            self.first = None
            self.gate = threading.Event()

        def issue(self, pieces):
            super().issue(pieces)
            token = object()
            self.first = self.first or token
            return token

        def wait(self, token, spin_s=0.0):
            if token is self.first:
                assert self.gate.wait(60)

    copier = Gated()
    link = Link("gated", copier, bandwidth=5e9, chunk_bytes=MiB, batch_chunks=1, depth=2)
    srcs = [np.full(MiB, v, np.uint8) for v in (1, 2)]
    dsts = [np.zeros(MiB, np.uint8) for _ in srcs]
    first = threading.Thread(target=link.move, args=(address(dsts[0]), address(srcs[0]), MiB))
    first.start()
    deadline = time.monotonic() + 60
    while copier.first is None and time.monotonic() < deadline:
        time.sleep(0.0005)
    second = link.move(address(dsts[1]), address(srcs[1]), MiB)   # while the first is held
    assert (dsts[1] == 2).all() and second.transfer.finished_at is not None
    assert first.is_alive() and link.moves == 1
    copier.gate.set()
    first.join(60)
    assert (dsts[0] == 1).all() and link.moves == 2 and link.bytes == 2 * MiB
