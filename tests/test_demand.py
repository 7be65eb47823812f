"""Room ahead of demand (Note [Reservation ahead of demand] in controller/demand.py): the
runtime reports what each activation put; the controller keeps room for it, grown off the
request path, for the function's window. The policy alone, then the real controller."""

import threading

import numpy as np
import pytest

from controller.demand import DemandTracker, fit
from faastube import errors, protocol, sdk

from .conftest import ControllerProcess, wait_for

MiB = 1 << 20


def activity(function="fn", seconds=0.01, **sizes):
    return protocol.Activity(function, seconds, {device: tuple(n) for device, n in sizes.items()})


# -- the policy ----------------------------------------------------------------------------

def test_a_function_seen_once_keeps_room_for_its_sizes_for_the_default_window():
    tracker = DemandTracker(default_window_s=60)
    tracker.record("ns", [activity(host=[5 * MiB, MiB])], now=100.0)
    assert tracker.wanted(100.0) == {("ns", "host"): [5 * MiB, MiB]}
    assert tracker.wanted(159.0) == {("ns", "host"): [5 * MiB, MiB]}
    assert tracker.wanted(161.0) == {}


def test_the_window_follows_the_intervals_between_activations():
    tracker = DemandTracker(default_window_s=60)
    for n in range(10):
        tracker.record("ns", [activity(host=[MiB])], now=10.0 + 2.0 * n)     # every 2 s
    (summary,) = tracker.summary(28.0)
    assert summary["window_s"] == pytest.approx(3.0)        # p99 interval 2 s, × 1.5
    assert tracker.wanted(28.0 + 2.9) and not tracker.wanted(28.0 + 3.1)


def test_overlapping_activations_multiply_the_room_and_the_largest_recent_activation_counts():
    tracker = DemandTracker(default_window_s=60)
    tracker.record("ns", [activity(seconds=1.0, host=[2 * MiB])], now=10.5)   # ran 9.5–10.5
    tracker.record("ns", [activity(seconds=1.0, host=[3 * MiB])], now=11.0)   # ran 10.0–11.0
    tracker.record("ns", [activity(function="other", host=[MiB], gpu=[4 * MiB])], now=11.0)
    assert tracker.wanted(11.0) == {("ns", "host"): [3 * MiB, 3 * MiB, MiB], ("ns", "gpu"): [4 * MiB]}
    concurrency = {s["function"]: s["concurrency"] for s in tracker.summary(11.0)}
    assert concurrency == {"fn": 2, "other": 1}


def test_the_window_and_concurrency_read_between_activations_follow_each_new_one():
    # They are kept from one activation to the next (read on every step of the reserver):
    # each new activation must still change them.
    tracker = DemandTracker(default_window_s=60)
    tracker.record("ns", [activity(seconds=0.1, host=[MiB])], now=10.0)
    tracker.record("ns", [activity(seconds=0.1, host=[MiB])], now=12.0)
    (summary,) = tracker.summary(12.0)
    assert summary["window_s"] == pytest.approx(3.0) and summary["concurrency"] == 1
    tracker.wanted(12.0)                                         # read again: the same
    tracker.record("ns", [activity(seconds=1.5, host=[MiB])], now=13.0)   # ran 11.5-13.0
    (summary,) = tracker.summary(13.0)
    assert summary["concurrency"] == 2                           # overlaps the one of 11.9-12.0
    assert summary["window_s"] == pytest.approx(2.4)             # starts 9.9, 11.5, 11.9: p99 1.6 s
    assert tracker.wanted(13.0) == {("ns", "host"): [MiB, MiB]}


def test_what_clients_report_is_kept_within_bounds():
    from controller import demand as policy
    tracker = DemandTracker(default_window_s=60)
    for n in range(policy.FUNCTIONS_KEPT + 500):
        tracker.record("ns", [activity(function=f"f{n}", host=list(range(1, 65)), elsewhere=[5])],
                       now=1.0, devices={"host"})
    assert len(tracker.summary(1.0, most=10**6)) == policy.FUNCTIONS_KEPT
    wanted = tracker.wanted(1.0)
    assert list(wanted) == [("ns", "host")]                       # unknown devices dropped
    assert wanted[("ns", "host")] == [64] * policy.WANTED_KEPT       # the largest, at most this many
    assert tracker.summary(1.0)[0]["bytes"] == {"host": sum(range(49, 65))}   # the 16 largest


def test_fit_places_the_largest_sizes_first_and_names_what_fits_nowhere():
    assert fit([10, 4], [3, 4, 6], align=lambda n: n) == ([0, 1], [], [0, 1])
    assert fit([10, 4], [8, 8], align=lambda n: n) == ([0], [8], [2, 4])
    assert fit([], [1], align=lambda n: n) == ([], [1], [])


def test_demand_entries_are_validated_like_any_field():
    envelope = protocol.decode_request({"v": 1, "seq": 1, "op": "ping",
                                        "demand": [["fn", 0.5, {"host": [10, 20]}]]})
    assert envelope.demand == (protocol.Activity("fn", 0.5, {"host": (10, 20)}),)
    for bad, text in (({"fn": 1}, "list of at most"), (["fn", 0.5, {}], "each 'demand' entry must be"),
                      ([["fn", -1, {}]], "'demand seconds' must be a number"),
                      ([["", 1, {}]], "'demand function' must be a non-empty"),
                      ([["fn", 1, {"host": list(range(65))}]], "at most 64 sizes"),
                      ([["fn", 1, {"host": [-5]}]], "'demand bytes' must be a non-negative")):
        with pytest.raises(errors.ProtocolError, match=text):
            protocol.decode_request({"v": 1, "seq": 1, "op": "ping", "demand": bad})


# -- through the controller ----------------------------------------------------------------

def host_pool(controller):
    return controller.status()["pools"][0]


def run_activation(ft, function, *sizes, keep):
    with sdk.activation(None, function):
        for size in sizes:
            keep.append(ft.put(np.ones(size, np.uint8)))


def test_after_one_activation_the_next_puts_grow_nothing_on_the_request_path(ft, controller):
    kept = []
    run_activation(ft, "keeper", 6 * MiB, keep=kept)           # no room yet: grown on its path
    assert host_pool(controller)["grown"]["request"]["slabs"] == 1
    wait_for(lambda: host_pool(controller)["grown"]["ahead"]["slabs"] == 1, message="room grown ahead")
    # The second put takes the room; it also asks for a spare of its signature (Note [Spare
    # objects]), whose create, sent without waiting, grows the pool once more while the
    # controller serves it. From then on the spare and the room kept ahead are always there.
    run_activation(ft, "keeper", 6 * MiB, keep=kept)
    ft.client().request(protocol.Ping())
    on_request = host_pool(controller)["grown"]["request"]["slabs"]
    assert on_request == 2
    for n in range(3):                                          # one more kept object each time
        wait_for(lambda: host_pool(controller)["grown"]["ahead"]["slabs"] == n + 2, message="the next room")
        run_activation(ft, "keeper", 6 * MiB, keep=kept)
    ft.client().request(protocol.Ping())
    pool = host_pool(controller)
    assert pool["grown"]["request"]["slabs"] == on_request     # nothing more on a request's path
    assert pool["ahead_wanted"] == {"test": 6 * MiB}
    (demand,) = controller.status()["demand"]
    assert (demand["namespace"], demand["function"], demand["activations"]) == ("test", "keeper", 5)
    assert demand["bytes"] == {"host": 6 * MiB} and demand["reserving"]
    from faastube.cli import render_status
    text = render_status(controller.status()).splitlines()
    room = text[text.index(next(line for line in text if line.startswith("pool host: "))) + 1]
    assert room.startswith("  room kept ahead 6.0 MiB for 1 namespaces; grown ahead ")
    assert room.endswith(f"on a request's path {on_request} (12.0 MiB); idle minimum 0 B")
    assert any(line.startswith("function keeper (namespace test): 5 activations, puts host 6.0 MiB each, "
                               "concurrency 1, window ") and line.endswith(", room kept") for line in text)
    assert all(int(ft.get(ref).sum()) == 6 * MiB for ref in kept)
    for ref in kept:
        ft.delete(ref)


def test_concurrent_activations_keep_room_for_each(ft, controller):
    both_running = threading.Barrier(2)
    refs = []

    def one(n):
        with sdk.activation(None, "pair"):
            refs.append(ft.put(np.full(5 * MiB, n, np.uint8)))
            both_running.wait(timeout=10)
    threads = [threading.Thread(target=one, args=(n,)) for n in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_for(lambda: host_pool(controller)["ahead_wanted"].get("test") == 10 * MiB, message="room for two")
    assert controller.status()["demand"][0]["concurrency"] == 2
    for ref in refs:
        ft.delete(ref)


def test_room_goes_once_the_window_passes_and_the_idle_minimum_stays(tmp_path, redis_server):
    ctl = ControllerProcess(tmp_path, redis_server.url, idle_release="0.3", idle_minimum="4MiB",
                            demand_window="0.6").start()
    client = ctl.client(spare_bytes=0)          # no spare object: only the room is counted
    try:
        sdk._client, saved = client, sdk._client
        with sdk.activation(None, "brief"):
            refs = [sdk.put(np.ones(3 * MiB, np.uint8)) for _ in range(2)]     # a 4 MiB slab each
            for ref in refs:
                client.request(protocol.Delete(ref["id"]))
        wait_for(lambda: host_pool(ctl)["ahead_wanted"] == {"test": 6 * MiB}, message="room kept")
        assert host_pool(ctl)["slabs"] == 2            # empty, idle, and kept: they hold the room
        # No activation within the window: the room is no longer kept, its slabs go idle,
        # and one 4 MiB slab, the idle minimum, stays.
        wait_for(lambda: host_pool(ctl)["ahead_wanted"] == {} and host_pool(ctl)["slabs"] == 1,
                 timeout=10, message="the room to go, down to the idle minimum")
    finally:
        sdk._client = saved
        client.close()
        assert ctl.stop() == 0


def test_one_namespace_keeps_at_most_its_share_of_the_pool_ahead(tmp_path, redis_server):
    ctl = ControllerProcess(tmp_path, redis_server.url, pool_limit="64MiB", reserve_share="0.25").start()
    client = ctl.client()
    try:
        # A hostile or mistaken report: 30 objects of 8 MiB, far more than a quarter of 64 MiB.
        client.connection.demand.append(protocol.Activity("greedy", 0.1, {"host": (8 * MiB,) * 30}))
        client.request(protocol.Ping())
        wait_for(lambda: host_pool(ctl)["grown"]["ahead"]["slabs"] == 2, message="room up to the share")
        assert host_pool(ctl)["reserved"] == 16 * MiB
        # Another namespace's put still finds room: it is not blocked by the reservation.
        other = ctl.client("other")
        target, object_id, _ = other.create_for_put((56 * MiB,), np.dtype("uint8"))   # needs the room
        del target
        other.seal(object_id, drop_writer=True)
        other.close()
    finally:
        client.close()
        assert ctl.stop() == 0


def test_an_action_run_by_the_runtime_reports_its_demand_under_its_name(controller, tmp_path):
    from .test_shim_openwhisk import Shim, source
    server = Shim(tmp_path, {"FAASTUBE_SOCKET": controller.socket, "FAASTUBE_REDIS": controller.redis_url})
    try:
        assert server.init(source("""
            import faastube, numpy
            def main(args):
                return {"ref": faastube.put(numpy.ones(2 << 20, numpy.uint8), consumers=1)}
        """))[0] == 200
        for n in range(2):
            status, _body = server.run({}, namespace="guest", action_name="/guest/maker",
                                       activation_id=f"a{n}")
            assert status == 200
        wait_for(lambda: any(d["function"] == "/guest/maker" and d["activations"] == 2
                             for d in controller.status().get("demand", [])), message="the action's demand")
        (demand,) = [d for d in controller.status()["demand"] if d["function"] == "/guest/maker"]
        assert demand["bytes"] == {"host": 2 << 20} and demand["namespace"] == "guest"
    finally:
        server.stop()
