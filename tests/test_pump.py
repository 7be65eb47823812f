"""The native pump (controller/native/pump.c, Note [The native pump]) with its host engine: a C
thread copying real memory in order at a set rate, as a copy engine does. Pieces arrive
intact; an express move goes ahead of what is still queued; normal pieces go on in short
pieces only while express moves are about; bad input is refused with a clear error; and a
link driven through a pump behaves as with any other copier."""

import os
import re
import threading

import numpy as np
import pytest

from controller.links import Link
from controller import pump
from controller.pump import Pump
from faastube.errors import PumpError, PumpUnavailable

from .test_links import address, move_at_once

MiB = 1 << 20


@pytest.fixture
def paced():
    """A pump whose engine copies at 1 GB/s: a 256 MiB move takes a quarter second."""
    made = Pump(1e9, host_rate=1e9)
    yield made
    made.close()


def test_pieces_of_any_size_arrive_intact_and_the_token_waits_for_all_of_them():
    with_pump = Pump(10e9)
    try:
        src = np.random.default_rng(1).integers(0, 256, 37 * MiB + 123, dtype=np.uint8)
        dst = np.zeros_like(src)
        bounds = [0, 1, 4097, 3 * MiB, 3 * MiB, 20 * MiB + 5, src.nbytes]     # one piece is empty
        token = with_pump.issue([(address(dst) + a, address(src) + a, b - a) for a, b in zip(bounds, bounds[1:])])
        with_pump.wait(token)
        np.testing.assert_array_equal(dst, src)
        stats = with_pump.stats()
        assert stats["bytes"] == src.nbytes and stats["pieces"] == 5 and stats["split_pieces"] == 0
    finally:
        with_pump.close()


def test_an_express_move_lands_while_a_large_move_is_still_queued(paced):
    big_src = np.random.default_rng(2).integers(0, 256, 256 * MiB, dtype=np.uint8)
    big_dst = np.zeros_like(big_src)
    token = paced.issue([(address(big_dst) + o, address(big_src) + o, 4 * MiB) for o in range(0, big_src.nbytes, 4 * MiB)])
    small_src, small_dst = np.full(MiB, 7, np.uint8), np.zeros(MiB, np.uint8)
    paced.move(address(small_dst), address(small_src), MiB)
    assert (small_dst == 7).all()
    # It went ahead: most of the large move (a quarter second at this rate) had not landed.
    assert paced.stats()["bytes"] < big_src.nbytes // 2
    paced.wait(token)
    assert np.array_equal(big_dst, big_src)
    stats = paced.stats()
    assert stats["express_pieces"] == 1
    assert stats["split_pieces"] > 0         # the large move went on in short pieces after it


def test_express_moves_go_in_the_order_they_came_and_all_land(paced):
    big_src, big_dst = np.ones(64 * MiB, np.uint8), np.zeros(64 * MiB, np.uint8)
    token = paced.issue([(address(big_dst), address(big_src), big_src.nbytes)])
    smalls = [(np.full(256 << 10, i, np.uint8), np.zeros(256 << 10, np.uint8)) for i in range(1, 9)]
    threads = [threading.Thread(target=paced.move, args=(address(d), address(s), s.nbytes)) for s, d in smalls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    paced.wait(token)
    assert all((d == s).all() for s, d in smalls) and (big_dst == 1).all()
    assert paced.stats()["express_pieces"] == 8


def test_bad_input_is_refused_and_the_pump_goes_on(paced):
    with pytest.raises(ValueError, match="pieces"):
        paced.issue([])
    with pytest.raises(ValueError, match="pieces"):
        paced.issue([(1, 2)])
    with pytest.raises(PumpError, match="unknown or spent"):
        paced.wait(12345)
    src, dst = np.ones(MiB, np.uint8), np.zeros(MiB, np.uint8)
    token = paced.issue([(address(dst), address(src), MiB)])
    paced.wait(token)
    with pytest.raises(PumpError, match="unknown or spent"):      # a token is waited for once
        paced.wait(token)
    with pytest.raises(ValueError, match="positive"):
        Pump(0)
    with pytest.raises(ValueError, match="negative"):
        Pump(1e9, lead_s=-1)
    assert (dst == 1).all()


def test_a_full_pump_refuses_more_moves_and_loses_none_it_took():
    full = Pump(1e9, host_rate=1e9)
    try:
        src = np.random.default_rng(4).integers(0, 256, 256 * 64 << 10, dtype=np.uint8)
        dst = np.zeros_like(src)
        tokens = [full.issue([(address(dst) + i * (64 << 10), address(src) + i * (64 << 10), 64 << 10)])
                  for i in range(256)]
        with pytest.raises(PumpError, match="no room"):
            full.issue([(address(dst), address(src), 1)])
        for token in tokens:
            full.wait(token)
        np.testing.assert_array_equal(dst, src)
    finally:
        full.close()


def test_a_compiler_that_fails_is_reported_with_its_message(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "false")
    with pytest.raises(PumpUnavailable, match="could not compile"):
        pump.build(str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(PumpUnavailable, match="cannot compile"):
        pump.build(str(tmp_path))
    assert not list(tmp_path.iterdir())           # nothing half-built left behind


def test_a_link_driven_through_a_pump_moves_concurrent_moves_intact():
    with_pump = Pump(2e9, host_rate=2e9)
    link = Link("host→host", with_pump, bandwidth=2e9, chunk_bytes=MiB, batch_chunks=1, depth=3)
    try:
        sources = [np.random.default_rng(i).integers(0, 256, (i + 1) * 3 * MiB + i, dtype=np.uint8)
                   for i in range(6)]
        sources += [np.full(MiB // 2, i, np.uint8) for i in range(4)]        # express moves
        move_at_once(link, sources)
        assert link.moves == len(sources) and link.queued == 0
        assert link.stats()["native_pump"] and with_pump.stats()["express_pieces"] >= 1
    finally:
        with_pump.close()


def test_a_closed_pump_lands_what_it_took_and_refuses_more():
    closing = Pump(1e9, host_rate=1e9)
    src = np.random.default_rng(5).integers(0, 256, 32 * MiB, dtype=np.uint8)
    dst = np.zeros_like(src)
    token = closing.issue([(address(dst), address(src), src.nbytes)])
    waiter = threading.Thread(target=closing.wait, args=(token,))
    waiter.start()
    closing.close()                    # returns once the queued move has landed
    waiter.join(60)
    assert not waiter.is_alive() and np.array_equal(dst, src)
    with pytest.raises(PumpError, match="closed"):
        closing.issue([(address(dst), address(src), 1)])


def test_faastube_status_shows_a_pump_links_counters():
    from faastube.cli import render_status
    with_pump = Pump(2e9)
    link = Link("host→host", with_pump, bandwidth=2e9, chunk_bytes=MiB, batch_chunks=2, depth=2)
    try:
        src, dst = np.ones(3 * MiB, np.uint8), np.zeros(3 * MiB, np.uint8)
        link.move(address(dst), address(src), src.nbytes)
        link.move(address(dst), address(src), MiB // 2)            # an express move
        status = {"node": "n", "epoch": "e", "clients": 0, "pools": [], "namespaces": {},
                  "links": {link.name: link.stats()}}
        text = render_status(status)
        assert "link host→host: 3.5 MiB in 2 transfers" in text
        assert re.search(r"native pump \(1 express moves, lead \d+ µs\)", text)   # the lead adapts
    finally:
        with_pump.close()


def test_a_library_folder_others_can_write_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)            # as a planted folder in /tmp could be
    with pytest.raises(PumpUnavailable, match="writable by others"):
        pump.build(str(shared))
    assert not list(shared.iterdir())
    own = tmp_path / "own"
    path = pump.build(str(own))     # a fresh folder is made for this user only
    assert os.stat(own).st_mode & 0o777 == 0o700 and os.path.basename(path).startswith("faastube-pump-")
