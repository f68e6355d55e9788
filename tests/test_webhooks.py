"""Webhooks end to end: a job's end POSTed to a receiver on 127.0.0.1 and checked with the Standard Webhooks
reference library, retries with growing gaps, a receiver that is down, hangs or says 410, the refusals of
`webhook_url`, and the pure parts (backoff, signing, secrets, the job codec, a job store that is not ours).

The server needs an API key for everything, so a signed image link that works without one shows it carries its
own permission."""

from __future__ import annotations

import base64
import itertools
import random
import re
import secrets
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from muse.cli import main
from muse.config import EMBEDDED_MODEL
from muse.core.jobcodec import error_from_json, error_to_json, request_from_json, request_to_json
from muse.core.jobstore import FILE_NAME, JobStore
from muse.core.service import Muse
from muse.core.webhooks import Webhooks as WebhookSender
from muse.core.webhooks import gap, load_secret, parse_secret, sign
from muse.datadir import DataDirError
from muse.errors import InvalidRequest, MuseError, TimedOut
from muse.messages import GenerateRequest, LoraUse, SourceImage
from tests.receiver import Delivery, Receiver, receiving
from tests.serving import BLOCKER, LiveServer, live_server, settings, wait_for, wait_idle

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
KEY = "webhook-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SMALL = {"prompt": "a red square", "steps": 2}
SIGNED_LINK = re.compile(r"/gallery/(?P<id>[0-9a-f]{16})\.png\?expires=(?P<expires>[0-9]+)&sig=(?P<sig>[0-9a-f]{32})")


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    options: dict[str, Any] = {
        "api_keys": KEY,
        "max_wait_ms": 1,
        "webhook_allow_hosts": "127.0.0.1",
        "webhook_secret": SECRET,
        "webhook_first_retry": 0.1,
    }
    with live_server(settings(EMBEDDED_MODEL, **options)) as s:
        yield s


# ---- helpers: the API with the key, and the server's webhook state -------------------------------------


def hooks(muse: Muse) -> WebhookSender:
    assert muse.webhooks is not None, "this server sends no webhooks"
    return muse.webhooks


def pending(server: LiveServer) -> int:
    return server.read(lambda m: hooks(m).store.pending())


def failed_attempts(server: LiveServer) -> int:
    return server.read(lambda m: hooks(m).failed_attempts)


def settled(server: LiveServer, timeout: float = 15.0) -> None:
    """Wait until no event waits in the outbox: everything delivered or given up."""
    wait_for(lambda: pending(server) == 0, timeout, what="the outbox to empty")


def post_job(server: LiveServer, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + "/api/jobs", json=body, headers=AUTH)


def submit(server: LiveServer, body: dict[str, Any]) -> str:
    response = post_job(server, body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def status(server: LiveServer, job_id: str, timeout: float = 5.0) -> dict[str, Any]:
    return dict(httpx.get(f"{server.url}/api/jobs/{job_id}", headers=AUTH, timeout=timeout).json())


def wait_state(server: LiveServer, job_id: str, states: set[str], timeout: float = 60.0) -> dict[str, Any]:
    return wait_for(lambda: (s := status(server, job_id))["status"] in states and s, timeout, 0.02, f"job in {states}")


def cancel(server: LiveServer, job_id: str) -> httpx.Response:
    return httpx.delete(f"{server.url}/api/jobs/{job_id}", headers=AUTH)


@contextmanager
def blocked(server: LiveServer) -> Iterator[None]:
    """The one worker busy with a long job for the duration; then it is cancelled and the batcher idles."""
    blocker = submit(server, BLOCKER)
    try:
        wait_state(server, blocker, {"running"})
        yield
    finally:
        cancel(server, blocker)
        wait_idle(server)


def stored_rows(muse: Muse) -> int:
    store = hooks(muse).store
    return len(store.unfinished()) + len(store.ended_since(0.0))


def deliveries(receiver: Receiver, count: int, timeout: float = 15.0) -> list[Delivery]:
    def enough() -> list[Delivery] | None:
        with receiver.lock:
            got = list(receiver.deliveries)
        return got if len(got) >= count else None

    return wait_for(enough, timeout, 0.01, f"{count} deliveries")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Hang:
    """A receiver that accepts connections and never answers."""

    port: int
    connections: list[socket.socket] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    @property
    def accepted(self) -> int:
        with self.lock:
            return len(self.connections)


@contextmanager
def hanging() -> Iterator[Hang]:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    hang = Hang(listener.getsockname()[1])
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with hang.lock:
                hang.connections.append(connection)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield hang
    finally:
        stop.set()
        thread.join(5)
        with hang.lock:
            for connection in hang.connections:
                connection.close()
        listener.close()


# ---- delivery over real HTTP ---------------------------------------------------------------------------


def test_a_succeeded_job_is_delivered_once_signed_with_a_link_that_needs_no_key(server: LiveServer) -> None:
    with receiving(SECRET) as receiver:
        job = submit(server, SMALL | {"seed": 11, "webhook_url": receiver.url})
        [delivery] = deliveries(receiver, 1)
        settled(server)
        assert len(receiver.deliveries) == 1, "delivered exactly once"
    assert delivery.verified and delivery.status == 200
    assert delivery.id.startswith("msg_")
    assert abs(int(delivery.headers["webhook-timestamp"]) - time.time()) < 5
    payload = delivery.payload
    assert payload["type"] == "job.succeeded"
    data = payload["data"]
    assert (data["id"], data["status"], data["seed"]) == (job, "succeeded", 11)
    assert data["images"][0]["seed"] == 11
    url = data["images"][0]["url"]
    assert url.startswith(server.url + "/gallery/") and SIGNED_LINK.search(url), url
    assert b"png_base64" not in delivery.body and b"iVBORw0KGgo" not in delivery.body, "links, not pictures"
    assert re.search(rb"[A-Za-z0-9+/=]{100,}", delivery.body) is None, "no base64 anywhere"
    image = httpx.get(url)  # no key: the link itself is the permission
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content.startswith(b"\x89PNG\r\n\x1a\n")


def test_the_signed_link_is_checked_and_the_bare_path_needs_a_key(server: LiveServer) -> None:
    with receiving(SECRET) as receiver:
        submit(server, SMALL | {"webhook_url": receiver.url})
        [delivery] = deliveries(receiver, 1)
        settled(server)
    url = delivery.payload["data"]["images"][0]["url"]
    link = SIGNED_LINK.search(url)
    assert link is not None
    assert httpx.get(url.split("?")[0]).status_code == 401
    forged = url.replace(link["sig"], "0" * 32)
    assert httpx.get(forged).status_code == 403
    assert httpx.get(url.split("?")[0], headers=AUTH).status_code == 200


def test_a_job_cancelled_while_queued_is_one_cancelled_event(server: LiveServer) -> None:
    with receiving(SECRET) as receiver:
        with blocked(server):
            job = submit(server, SMALL | {"webhook_url": receiver.url})
            cancelled = cancel(server, job)
            assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        [delivery] = deliveries(receiver, 1)
        settled(server)
        assert len(receiver.deliveries) == 1
    assert delivery.verified
    payload = delivery.payload
    assert payload["type"] == "job.cancelled"
    assert payload["data"]["id"] == job and payload["data"]["status"] == "cancelled"
    assert payload["data"]["error"]["code"] == "cancelled"
    assert "images" not in payload["data"]


def test_a_job_past_its_deadline_is_one_failed_event_with_its_error(server: LiveServer) -> None:
    with receiving(SECRET) as receiver:
        with blocked(server):
            job = submit(server, SMALL | {"timeout_s": 0.2, "webhook_url": receiver.url})
            wait_state(server, job, {"failed"})
        [delivery] = deliveries(receiver, 1)
        settled(server)
        assert len(receiver.deliveries) == 1
    assert delivery.verified
    data = delivery.payload["data"]
    assert delivery.payload["type"] == "job.failed"
    assert data["id"] == job and data["status"] == "failed"
    assert data["error"]["code"] == "deadline_exceeded"


def test_a_request_refused_by_validation_sends_no_event(server: LiveServer) -> None:
    with receiving(SECRET) as receiver:
        refused = post_job(server, {"prompt": "x", "steps": 0, "webhook_url": receiver.url})
        assert refused.status_code == 422 and refused.json()["error"]["param"] == "steps"
        # A later job's delivery is the point by which an event of the refused one would have come.
        marker = submit(server, SMALL | {"webhook_url": receiver.url})
        deliveries(receiver, 1)
        settled(server)
        assert [d.payload["data"]["id"] for d in receiver.deliveries] == [marker]


def test_a_failing_receiver_is_retried_with_growing_gaps_until_it_answers_410(server: LiveServer) -> None:
    settled(server)
    delivered_before = server.read(lambda m: hooks(m).delivered)
    with receiving(SECRET, status=500) as receiver:
        submit(server, SMALL | {"webhook_url": receiver.url})
        first = deliveries(receiver, 5)
        with receiver.lock:
            receiver.status = 410
        settled(server)
        attempts = list(receiver.deliveries)
    assert all(d.verified for d in attempts)
    assert len({d.id for d in attempts}) == 1, "every attempt of one event carries the same webhook-id"
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(first)]
    assert all(b > a for a, b in itertools.pairwise(gaps)), gaps
    statuses = [d.status for d in attempts]
    assert statuses[-1] == 410 and set(statuses[:-1]) == {500} and len(statuses) >= 6, statuses
    assert server.read(lambda m: hooks(m).delivered) == delivered_before, "a 410 is not a delivery"


def test_a_receiver_that_comes_back_gets_the_event(server: LiveServer) -> None:
    settled(server)
    port = free_port()
    before = failed_attempts(server)
    job = submit(server, SMALL | {"webhook_url": f"http://127.0.0.1:{port}/hook"})
    wait_state(server, job, {"succeeded"})
    wait_for(lambda: failed_attempts(server) >= before + 3, 15, what="three refused attempts")
    with receiving(SECRET, port=port) as receiver:
        up = time.monotonic()
        [delivery] = deliveries(receiver, 1, timeout=10)
        assert delivery.at - up < 5, "heard within seconds of coming back"
        settled(server)
        assert len(receiver.deliveries) == 1
    assert delivery.verified and delivery.status == 200
    assert delivery.payload["data"]["id"] == job


def test_a_hanging_receiver_never_holds_up_jobs_and_is_retried(server: LiveServer) -> None:
    settled(server)
    timeout = server.read(lambda m: hooks(m).timeout)
    server.read(lambda m: setattr(hooks(m), "timeout", 0.5))
    before = failed_attempts(server)
    port = 0
    try:
        with hanging() as hang:
            port = hang.port
            job = submit(server, SMALL | {"webhook_url": hang.url})
            wait_for(lambda: hang.accepted >= 1, 30, what="the first attempt to connect")
            assert status(server, job, timeout=2)["status"] == "succeeded", "the job ended before its webhook"
            other = submit(server, SMALL)
            assert wait_state(server, other, {"succeeded"}, timeout=30)["status"] == "succeeded"
            wait_for(lambda: failed_attempts(server) >= before + 2 and hang.accepted >= 2, 15, what="a retry")
    finally:
        server.read(lambda m: setattr(hooks(m), "timeout", timeout))
        if port:  # the event still waits: a receiver on its port that wants no more settles it
            with receiving(SECRET, status=410, port=port):
                settled(server)


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.5/x",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]:9/x",
        "http://127.0.0.2/x",
        "ftp://example.com/x",
        "http://example.com/" + "a" * 2048,
        "http://user:pw@127.0.0.1/x",
    ],
    ids=["private", "metadata", "ipv6-loopback", "loopback-not-allowed", "ftp", "too-long", "userinfo"],
)
def test_a_webhook_url_no_delivery_may_reach_is_refused_and_nothing_is_queued(server: LiveServer, url: str) -> None:
    before = server.read(lambda m: (len(m.jobs), stored_rows(m)))
    refused = post_job(server, SMALL | {"webhook_url": url})
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["param"] == "webhook_url"
    assert server.read(lambda m: (len(m.jobs), stored_rows(m))) == before


def test_a_server_without_a_gallery_refuses_webhooks_but_takes_jobs() -> None:
    with live_server(settings(EMBEDDED_MODEL, no_gallery=True), ready=False) as bare:
        refused = httpx.post(bare.url + "/api/jobs", json=SMALL | {"webhook_url": "http://127.0.0.1:9/x"})
        assert refused.status_code == 422 and refused.json()["error"]["param"] == "webhook_url"
        assert bare.read(lambda m: len(m.jobs)) == 0
        accepted = httpx.post(bare.url + "/api/jobs", json=SMALL)
        assert accepted.status_code == 202, accepted.text
        httpx.delete(f"{bare.url}/api/jobs/{accepted.json()['id']}")  # nothing left to drain


# ---- policy, signing and secrets -----------------------------------------------------------------------


@pytest.mark.parametrize("first", [0.1, 2.0])
def test_the_first_gap_is_the_first_retry_less_its_jitter(first: float) -> None:
    rng = random.Random(1)
    for _ in range(100):
        assert 0.75 * first <= gap(1, 0.0, first, rng) <= first


def schedule(first: float, until: float, rng: random.Random) -> list[tuple[float, float]]:
    """(age, gap) of each failed attempt of an event failing for `until` seconds."""
    age, attempts, out = 0.0, 0, []
    while age < until:
        attempts += 1
        wait = gap(attempts, age, first, rng)
        out.append((age, wait))
        age += wait
    return out


def test_gaps_grow_by_half_at_least_until_a_minute_in_the_first_hour() -> None:
    for seed in range(20):
        plan = schedule(2.0, 3600.0, random.Random(seed))
        gaps = [wait for age, wait in plan if age < 3600.0]
        assert max(gaps) <= 60.0
        growing = [g for g in gaps if g < 0.75 * 60]  # below the cap's jitter band
        assert growing == gaps[: len(growing)], "they grow until the cap, then stay there"
        assert all(b >= 1.5 * a for a, b in itertools.pairwise(growing)), growing
        assert gaps[len(growing)] >= 0.75 * 60, "the cap is reached"


def test_gaps_reach_an_hour_later_and_never_more() -> None:
    plan = schedule(2.0, 86400.0, random.Random(3))
    later = [wait for age, wait in plan if age >= 3600.0]
    assert all(wait <= 3600.0 for _, wait in plan)
    assert max(later) >= 0.75 * 3600
    assert 0.75 * 3600 <= gap(10_000, 90_000.0, 2.0, random.Random(0)) <= 3600.0, "no overflow however many"


def test_a_signature_verifies_with_the_reference_library() -> None:
    body = b'{"type":"job.succeeded","data":{"id":"abc"}}'
    timestamp = int(time.time())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(parse_secret(SECRET), "msg_1", timestamp, body),
    }
    assert Webhook(SECRET).verify(body, headers) == {"type": "job.succeeded", "data": {"id": "abc"}}
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body.replace(b"abc", b"abd"), headers)


@pytest.mark.parametrize(
    "secret",
    [
        "sk_" + base64.b64encode(bytes(32)).decode(),
        "whsec_not base64!",
        "whsec_" + base64.b64encode(bytes(16)).decode(),
        "whsec_" + base64.b64encode(bytes(65)).decode(),
    ],
    ids=["not-whsec", "not-base64", "too-short", "too-long"],
)
def test_a_secret_that_is_not_whsec_base64_of_24_to_64_bytes_is_refused(secret: str) -> None:
    with pytest.raises(ValueError):
        parse_secret(secret)


def test_a_whsec_secret_is_its_key() -> None:
    assert parse_secret(SECRET) == base64.b64decode(SECRET.removeprefix("whsec_"))


def test_muse_webhook_secret_prints_the_same_secret_each_time_kept_owner_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["webhook-secret", "--data-dir", str(tmp_path)]) == 0
    first = capsys.readouterr().out.strip()
    assert main(["webhook-secret", "--data-dir", str(tmp_path)]) == 0
    second = capsys.readouterr().out.strip()
    assert first == second and first.startswith("whsec_")
    assert len(parse_secret(first)) == 32
    assert load_secret(tmp_path) == first
    assert stat.S_IMODE((tmp_path / "webhook-secret").stat().st_mode) == 0o600


# ---- the job codec and the job store -------------------------------------------------------------------


def test_a_request_with_a_picture_a_mask_and_loras_survives_json() -> None:
    request = GenerateRequest(
        prompt="a lighthouse",
        seed=42,
        steps=12,
        guidance_scale=6.5,
        width=64,
        height=96,
        n=2,
        negative_prompt="fog",
        timeout_s=30.0,
        scheduler="euler",
        source=SourceImage(image=b"\x89PNG picture\x00\xff", strength=0.6, mask=b"\x89PNG mask\x01", flow=True),
        loras=(LoraUse("ink", 0.5), LoraUse("watercolor", 1.25)),
    )
    assert request_from_json(request_to_json(request)) == request
    unmasked = GenerateRequest("p", 1, 2, 3.0, 64, 64, source=SourceImage(b"img", 0.3))
    assert request_from_json(request_to_json(unmasked)) == unmasked


@pytest.mark.parametrize(
    "error",
    [InvalidRequest("bad steps", param="steps", code="too_many", status=400), TimedOut("late"), MuseError("boom")],
    ids=["invalid", "timed-out", "server"],
)
def test_an_error_survives_json_as_the_client_saw_it(error: MuseError) -> None:
    back = error_from_json(error_to_json(error))
    assert back is not None
    assert (back.message, back.param, back.code, back.status, back.type) == (
        error.message,
        error.param,
        error.code,
        error.status,
        error.type,
    )
    assert error_to_json(None) is None and error_from_json(None) is None


def spoil(database: Path, kind: str) -> None:
    if kind == "corrupt":
        database.write_bytes(b"not a database" * 100)
    else:
        with sqlite3.connect(database) as other:
            other.execute("CREATE TABLE accounts(x)")
        other.close()


@pytest.mark.parametrize("kind", ["corrupt", "foreign"])
def test_a_job_store_that_is_not_ours_is_refused_in_one_line_and_left_as_it_is(tmp_path: Path, kind: str) -> None:
    database = tmp_path / FILE_NAME
    spoil(database, kind)
    before = database.read_bytes()
    with pytest.raises(DataDirError) as refused:
        JobStore(tmp_path)
    message = str(refused.value)
    assert "\n" not in message and str(database) in message
    assert ("accounts" in message) == (kind == "foreign")
    assert database.read_bytes() == before, "never overwritten"


@pytest.mark.parametrize("kind", ["corrupt", "foreign"])
def test_muse_serve_on_a_job_store_that_is_not_ours_exits_2_naming_it(tmp_path: Path, kind: str) -> None:
    database = tmp_path / FILE_NAME
    spoil(database, kind)
    before = database.read_bytes()
    run = subprocess.run(
        [sys.executable, "-m", "muse", "serve", "--port", "0", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("muse serve: error: ") and str(database) in lines[0]
    assert database.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILE_NAME, "muse.lock"], "a refused start writes nothing"


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--webhook-secret", "hunter2"], "--webhook-secret"),
        (["--webhook-secret", "whsec_c2hvcnQ="], "--webhook-secret"),
        (["--webhook-allow-hosts", "10.0.0.1/8"], "--webhook-allow-hosts"),
        (["--webhook-allow-hosts", "ok.example,bad host"], "--webhook-allow-hosts"),
    ],
)
def test_a_webhook_flag_no_delivery_could_use_stops_the_start_naming_it(
    flags: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["serve", *flags])
    assert stopped.value.code == 2
    assert named in capsys.readouterr().err
