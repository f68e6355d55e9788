"""The Ray pool on a real local two-node Ray cluster (loopback only): workers as actors on both nodes, the
same pixels as the plain pipeline, a killed actor and a lost node retried, scaling 1 -> 2 -> 1 with a drain.

One cluster for the module (about 4 s to start); each test starts its own server on it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from muse.pools.handles import WorkerHandle, WorkerState
from muse.worker.pipeline import LoadedPipeline, load_pipeline
from tests.pixels import assert_plain
from tests.serving import LiveServer, live_server, metric, settings, submit_job, wait_for, wait_job

# Ray advertises the machine's external address unless told otherwise; keep every connection on loopback.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import ray
from ray.cluster_utils import Cluster

NODE = {"num_cpus": 2, "node_ip_address": "127.0.0.1"}
WAITING = {"queued", "running"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    cluster.add_node(**NODE)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def direct(tiny_model: str) -> LoadedPipeline:
    return load_pipeline(tiny_model, "cpu")


def ray_settings(model: str, cluster: Cluster, **overrides: Any) -> Any:
    base = {"pool": "ray", "ray_address": cluster.address, "devices": "cpu,cpu", "threads_per_worker": 1}
    return settings(model, **(base | overrides))


def ready(server: LiveServer) -> list[WorkerHandle]:
    return server.read(lambda m: [w for w in m.pool.workers if w.state in (WorkerState.IDLE, WorkerState.BUSY)])


def wait_ready(server: LiveServer, count: int) -> list[WorkerHandle]:
    return wait_for(lambda: len(r := ready(server)) == count and r, 120, 0.05, f"{count} ready actor(s)")


def busy(server: LiveServer) -> WorkerHandle:
    return wait_for(
        lambda: server.read(lambda m: next((w for w in m.pool.workers if w.state is WorkerState.BUSY), None)),
        60,
        0.01,
        "a busy actor",
    )


def test_actors_on_both_nodes_serve_the_plain_pipelines_pixels(
    tiny_model: str, cluster: Cluster, direct: LoadedPipeline
) -> None:
    bodies = [{"prompt": "a red circle", "steps": 40, "seed": 3}, {"prompt": "a blue star", "steps": 40, "seed": 4}]
    with live_server(ray_settings(tiny_model, cluster)) as server:
        workers = wait_ready(server, 2)
        assert len(server.read(lambda m: m.pool.nodes())) == 2, "one actor on each node (SPREAD)"
        # Each request takes the idle actor with the most free slots: one each.
        jobs = [submit_job(server, body) for body in bodies]
        results = [wait_job(server, job, {"succeeded", "failed"}) for job in jobs]
        assert all(server.read(lambda m, w=w: w.assignments_done) >= 1 for w in workers)
        text = httpx.get(server.url + "/metrics").text
        assert text.count("muse_workers_by_node{") == 2, text
    for body, result in zip(bodies, results, strict=True):
        assert_plain(direct, body, result)


def test_an_actor_killed_mid_batch_is_retried_and_the_pool_returns_to_its_target(
    tiny_model: str, cluster: Cluster, direct: LoadedPipeline
) -> None:
    body = {"prompt": "killed", "steps": 150, "seed": 9, "n": 2}
    with live_server(ray_settings(tiny_model, cluster)) as server:
        wait_ready(server, 2)
        job = submit_job(server, body)
        victim = busy(server)
        server.read(lambda m: ray.kill(victim.link.actor))  # type: ignore[attr-defined]
        result = wait_job(server, job, {"succeeded", "failed"})
        assert metric(server, "muse_batches_retried_total") == 1
        survivors = wait_ready(server, 2)
        assert victim not in survivors
    assert_plain(direct, body, result)


def test_a_lost_node_has_its_work_retried_and_the_pool_returns_to_its_target(
    tiny_model: str, cluster: Cluster, direct: LoadedPipeline
) -> None:
    extra = cluster.add_node(**NODE)
    body = {"prompt": "node lost", "steps": 150, "seed": 12}
    # Three actors on three nodes, each running one request (an idle actor takes the next one); the node lost
    # is not the head's (the test's own Ray driver is connected there).
    with live_server(ray_settings(tiny_model, cluster, devices="cpu,cpu,cpu")) as server:
        workers = wait_ready(server, 3)
        assert len(server.read(lambda m: m.pool.nodes())) == 3
        jobs = {submit_job(server, body | {"seed": 12 + i}): body | {"seed": 12 + i} for i in range(3)}
        wait_for(lambda: all(server.read(lambda m, w=w: w.state) is WorkerState.BUSY for w in workers), 60, 0.01)
        head = cluster.head_node.node_id
        victim = next(w for w in workers if not head.startswith(w.link.node.split("/")[1]))
        node = victim.link.node
        doomed = next(n for n in cluster.list_all_nodes() if n.node_id.startswith(node.split("/")[1]))
        cluster.remove_node(doomed)
        results = {job: wait_job(server, job, {"succeeded", "failed"}) for job in jobs}
        metric_retried = metric(server, "muse_batches_retried_total")
        # Back at three actors, on the nodes that are left.
        wait_for(lambda: len(ready(server)) == 3 and node not in server.read(lambda m: m.pool.nodes()), 120)
    if doomed is not extra:
        cluster.add_node(**NODE)  # the other tests expect two nodes
    assert metric_retried >= 1
    for job, sent in jobs.items():
        assert_plain(direct, sent, results[job])


def test_scaling_one_two_one_drains_an_actor_before_it_stops(tiny_model: str, cluster: Cluster) -> None:
    config = ray_settings(
        tiny_model, cluster, min_workers=1, max_workers=2, upscale_delay=0.0, downscale_delay=1.0, scale_interval=0.2,
        max_batch_size=2,
    )  # fmt: skip
    with live_server(config) as server:
        wait_ready(server, 1)
        jobs: list[str] = []

        def keep_busy() -> list[WorkerHandle] | None:
            """Three requests waiting or running at all times, until a second actor has loaded."""
            unfinished = [j for j in jobs if httpx.get(f"{server.url}/api/jobs/{j}").json()["status"] in WAITING]
            for _ in range(3 - len(unfinished)):
                jobs.append(submit_job(server, {"prompt": f"load {len(jobs)}", "steps": 150, "n": 2}))
            workers = ready(server)
            return workers if len(workers) == 2 else None

        two = wait_for(keep_busy, 120, 0.05, "a second actor under load")
        assert all(wait_job(server, job, {"succeeded", "failed"})["status"] == "succeeded" for job in jobs)
        wait_for(lambda: len(server.read(lambda m: m.pool.workers)) == 1, 60, what="scaled back to one actor")
        stopped = next(w for w in two if server.read(lambda m, w=w: w.state) is WorkerState.DEAD)
        # Drained and stopped (asked to stop once idle), not killed.
        assert not server.read(lambda m: stopped.killed)
        assert metric(server, 'muse_requests_total{outcome="succeeded"}') == len(jobs)


def test_an_actor_the_cluster_has_no_room_for_is_reported_pending(tiny_model: str, cluster: Cluster) -> None:
    # Each worker asks for 64 CPUs; no node has them.
    with live_server(ray_settings(tiny_model, cluster, devices="cpu", threads_per_worker=64), ready=False) as server:
        reason = wait_for(
            lambda: (r := httpx.get(server.url + "/readyz")).status_code == 503 and "resources" in r.text and r.text,
            60,
            0.1,
            "the actor reported pending",
        )
        assert "1 worker(s) waiting for resources" in reason
        assert metric(server, 'muse_workers{state="pending"}') == 1


def test_sigterm_drains_accepted_requests_and_exits_zero_as_the_local_pool_does(
    tiny_model: str, cluster: Cluster
) -> None:
    """`muse serve --pool ray` stopped by SIGTERM (systemd, a Kubernetes pod ending) finishes what it accepted,
    stops its actors and exits 0: Ray's own fatal-signal handler must not be the one that answers."""
    import signal
    import threading

    from tests.process import serve_process

    flags = ["--model", tiny_model, "--pool", "ray", "--ray-address", cluster.address, "--devices", "cpu,cpu"]
    with serve_process(*flags, "--threads-per-worker", "1") as server:
        results: list[int] = []

        def call(i: int) -> None:
            body = {"prompt": f"drain {i}", "steps": 40, "seed": i}
            results.append(httpx.post(server.url + "/api/generate", json=body, timeout=300).status_code)

        callers = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        for caller in callers:
            caller.start()
        accepted = ("muse_queue_images", "muse_inflight_images")
        wait_for(lambda: sum(metric(server, name) for name in accepted) == 4, 60, 0.02, "4 accepted")
        server.process.send_signal(signal.SIGTERM)
        for caller in callers:
            caller.join(300)
        assert results == [200, 200, 200, 200], server.log.read_text()[-3000:]
        assert server.process.wait(120) == 0, server.log.read_text()[-3000:]
    assert "SIGTERM received" not in server.log.read_text()
