"""Many real function processes at once, and function processes killed with SIGKILL."""

import json
import signal

import pytest

from .conftest import wait_for


def namespace_status(controller, namespace="test"):
    return controller.status()["namespaces"].get(namespace, {})


def test_eight_processes_put_and_get_concurrently_with_checksums(worker_env, redis_server):
    key = "churn-board"
    procs = [worker_env.start("churn.py", redis_server.url, key, 40, seed) for seed in range(8)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r == {"puts": 40, "gets": 40, "verified": 40} for r in results)


def test_a_consumer_in_another_process_sees_the_producers_bytes(worker_env):
    produced = worker_env.run("function.py", "put", 3_000_000, 42)
    consumed = worker_env.run("function.py", "get", json.dumps(produced["ref"]))
    assert consumed["sha"] == produced["sha"]
    assert consumed["shape"] == [3_000_000] and consumed["dtype"] == "uint8"


def test_consumers_count_releases_across_processes(worker_env, ft):
    produced = worker_env.run("function.py", "put", 1000, 1, 2)      # consumers=2
    for _ in range(2):
        worker_env.run("function.py", "get", json.dumps(produced["ref"]))
    with pytest.raises(ft.errors.ObjectDeletedError, match="all its consumers"):
        ft.get(produced["ref"])


def test_producer_killed_mid_write_frees_its_unsealed_object(worker_env, controller, ft):
    producer = worker_env.start("function.py", "pending", 2_000_000)
    ref = worker_env.read_json(producer)["ref"]
    assert namespace_status(controller)["pending"] == 1
    producer.send_signal(signal.SIGKILL)
    producer.wait()
    # The namespace drops out of the status once its last slab goes (a closed writer's empty
    # slab is retired at once: Note [Slabs of one writer]).
    wait_for(lambda: namespace_status(controller).get("pending", 0) == 0
             and namespace_status(controller).get("used", 0) == 0, message="the aborted object to be freed")
    with pytest.raises(ft.errors.ObjectDeletedError, match="never sealed"):
        ft.get(ref, timeout=1)


def test_a_get_waiting_on_a_killed_producer_fails_at_once(worker_env, ft):
    producer = worker_env.start("function.py", "pending", 1000)
    ref = worker_env.read_json(producer)["ref"]
    import threading
    outcome = {}

    def consumer():
        try:
            ft.get(ref, timeout=60)
        except Exception as exc:
            outcome["error"] = exc
    thread = threading.Thread(target=consumer)
    thread.start()
    producer.send_signal(signal.SIGKILL)
    producer.wait()
    thread.join(10)
    assert not thread.is_alive()
    assert isinstance(outcome["error"], ft.errors.ObjectDeletedError)


def test_consumer_killed_while_holding_a_view_drops_its_lease(worker_env, controller, ft):
    produced = worker_env.run("function.py", "put", 500_000, 3)
    holder = worker_env.start("function.py", "hold", json.dumps(produced["ref"]))
    assert worker_env.read_json(holder)["sha"] == produced["sha"]
    ft.delete(produced["ref"])
    # Deleted but still viewed: the bytes stay allocated (Note [Leases pin memory]).
    status = namespace_status(controller)
    assert status["objects"] == 0 and status["leases"] == 1 and status["used"] > 0
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    wait_for(lambda: namespace_status(controller).get("leases", 0) == 0
             and namespace_status(controller).get("used", 0) == 0, message="the killed consumer's lease")


def test_a_live_view_keeps_its_bytes_after_delete_in_another_process(worker_env, ft):
    produced = worker_env.run("function.py", "put", 300_000, 9)
    holder = worker_env.start("function.py", "hold", json.dumps(produced["ref"]))
    assert worker_env.read_json(holder)["sha"] == produced["sha"]
    ft.delete(produced["ref"])
    for seed in range(20):                       # churn the namespace's memory
        worker_env.run("function.py", "put", 300_000, 100 + seed)
    holder.stdin.close()                         # let the holder re-hash its view
    assert worker_env.read_json(holder)["sha_after"] == produced["sha"]
    holder.wait(10)


@pytest.mark.slow
def test_fifty_killed_processes_leak_nothing(worker_env, controller):
    produced = worker_env.run("function.py", "put", 100_000, 5)
    victims = []
    for i in range(50):
        if i % 2:
            victims.append(worker_env.start("function.py", "pending", 200_000))
        else:
            victims.append(worker_env.start("function.py", "hold", json.dumps(produced["ref"])))
    for victim in victims:
        worker_env.read_json(victim, timeout=60)
    assert namespace_status(controller)["clients"] == 50
    for victim in victims:
        victim.send_signal(signal.SIGKILL)
    for victim in victims:
        victim.wait()

    def settled():
        s = namespace_status(controller)
        return s["leases"] == 0 and s["pending"] == 0 and s["clients"] == 0 and s["objects"] == 1
    wait_for(settled, timeout=20, message="all 50 killed processes to be cleaned up")
    # Only the one sealed object's bytes remain in use.
    assert namespace_status(controller)["used"] == 100_096
