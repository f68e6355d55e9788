"""A local fake of the parts of Slack the bot uses, for tests: the Web API over HTTP and socket mode over a websocket.

It runs an aiohttp server on 127.0.0.1 (ephemeral port) in its own thread and event loop, so a test
can drive it from plain synchronous code while the Muse server runs in another thread:

- Web API (`/api/<method>`): auth.test, apps.connections.open (a loopback `ws://` URL), conversations.info,
  chat.postEphemeral, chat.postMessage, files.getUploadURLExternal (a loopback upload URL),
  files.completeUploadExternal. Tokens are checked like Slack does (`invalid_auth`), and a channel the
  bot is not in answers `not_in_channel`, as Slack does.
- `/upload/<file_id>`: the upload itself; `/respond/<id>`: a command's response_url.
- `/link`: the socket-mode websocket. It says hello, sends `slash_commands` envelopes on request and
  records each ack with its latency. `drop()` closes the socket, aborts it, or asks for a refresh.

Every record is guarded by one Condition; `wait()` blocks on it with a deadline instead of sleeping.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import WSMsgType, web

T = TypeVar("T")


@dataclass
class Channel:
    id: str
    name: str
    member: bool = True
    info_error: str | None = None  # what conversations.info answers instead, e.g. "missing_scope"


@dataclass
class Ack:
    envelope_id: str
    payload: dict[str, Any]
    latency_s: float


@dataclass
class Share:
    """One files.completeUploadExternal call that succeeded."""

    channel: str
    comment: str
    files: list[bytes]
    titles: list[str]


@dataclass
class Socket:
    request: web.Request
    ws: web.WebSocketResponse


@dataclass
class State:
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    acks: dict[str, Ack] = field(default_factory=dict)
    ephemerals: list[dict[str, Any]] = field(default_factory=list)  # chat.postEphemeral and response_url posts
    shares: list[Share] = field(default_factory=list)
    uploads: dict[str, bytes] = field(default_factory=dict)
    connections: int = 0  # websockets ever accepted


class FakeSlack:
    def __init__(self, *, bot_token: str = "xoxb-test", app_token: str = "xapp-test") -> None:
        self.bot_token = bot_token
        self.app_token = app_token
        self.channels: dict[str, Channel] = {}
        self.add_channel("C_GENERAL", "general")
        self.fail_uploads = False
        self.state = State()
        self.changed = threading.Condition()
        self.url = ""
        self._ids = itertools.count(1)
        self._sent: dict[str, float] = {}
        self._requesters: dict[str, str] = {}  # envelope id -> user, for response_url posts
        self._sockets: list[Socket] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="fake-slack")
        self._runner: web.AppRunner | None = None

    # ---- lifecycle (called from the test's thread) --------------------------------------------------

    def start(self) -> FakeSlack:
        self._thread.start()
        self.url = self._call(self._start())
        return self

    def stop(self) -> None:
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    @property
    def api_url(self) -> str:
        return f"{self.url}/api/"

    def add_channel(self, channel_id: str, name: str, *, member: bool = True, info_error: str | None = None) -> None:
        self.channels[channel_id] = Channel(channel_id, name, member, info_error)

    # ---- driving and observing --------------------------------------------------------------------

    def send_command(
        self, text: str, *, user: str = "U_ALICE", channel: str = "C_GENERAL", command: str = "/muse"
    ) -> str:
        """Send a `slash_commands` envelope on the open socket; returns its envelope id."""
        envelope_id = f"env-{next(self._ids)}"
        name = self.channels[channel].name if channel in self.channels else "privategroup"
        payload = {
            "token": "verification-token-not-a-secret",
            "team_id": "T_FAKE",
            "team_domain": "fake",
            "channel_id": channel,
            "channel_name": name,
            "user_id": user,
            "user_name": user.lower(),
            "command": command,
            "text": text,
            "api_app_id": "A_MUSE",
            "is_enterprise_install": "false",
            "response_url": f"{self.url}/respond/{envelope_id}",
            "trigger_id": f"trigger-{envelope_id}",
        }
        self._requesters[envelope_id] = user
        envelope = {"envelope_id": envelope_id, "type": "slash_commands", "accepts_response_payload": True}
        self._call(self._send(envelope | {"payload": payload}))
        return envelope_id

    def drop(self, how: str = "close") -> None:
        """End the open socket: `close` (a close frame), `abort` (the TCP connection just dies) or `refresh`
        (Slack's `disconnect` message, asking the client to reconnect)."""
        self._call(self._drop(how))

    def wait(self, condition: Callable[[State], T], timeout: float = 30.0, what: str = "") -> T:
        """Block until `condition(state)` is truthy (checked whenever the fake records something)."""
        with self.changed:
            value = self.changed.wait_for(lambda: condition(self.state), timeout)
        if not value:
            raise AssertionError(f"fake Slack: timed out after {timeout:g} s waiting for {what or condition}")
        return value

    def wait_connected(self, count: int = 1, timeout: float = 30.0) -> None:
        self.wait(lambda s: s.connections >= count and self.open_sockets() > 0, timeout, f"socket #{count}")

    def wait_ack(self, envelope_id: str, timeout: float = 10.0) -> Ack:
        return self.wait(lambda s: s.acks.get(envelope_id), timeout, f"the ack of {envelope_id}")

    def wait_ephemeral(self, user: str, contains: str, timeout: float = 60.0) -> dict[str, Any]:
        return self.wait(
            lambda s: next((e for e in s.ephemerals if e["user"] == user and contains in e["text"]), None),
            timeout,
            f"an ephemeral message to {user} containing {contains!r}",
        )

    def wait_share(self, contains: str, timeout: float = 60.0) -> Share:
        return self.wait(
            lambda s: next((sh for sh in s.shares if contains in sh.comment), None), timeout, f"an upload {contains!r}"
        )

    def calls(self, method: str) -> list[dict[str, Any]]:
        with self.changed:
            return [params for name, params in self.state.calls if name == method]

    def open_sockets(self) -> int:
        return sum(1 for s in self._sockets if not s.ws.closed)

    # ---- internals (the fake's own loop) ------------------------------------------------------------

    def _call(self, coroutine: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def _record(self, update: Callable[[State], None]) -> None:
        with self.changed:
            update(self.state)
            self.changed.notify_all()

    async def _start(self) -> str:
        app = web.Application()
        app.router.add_post("/api/{method}", self._api)
        app.router.add_get("/api/{method}", self._api)
        app.router.add_post("/upload/{file_id}", self._upload)
        app.router.add_post("/respond/{envelope_id}", self._respond)
        app.router.add_get("/link", self._socket)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    async def _stop(self) -> None:
        for socket in self._sockets:
            await socket.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _send(self, message: dict[str, Any]) -> None:
        live = [s for s in self._sockets if not s.ws.closed]
        if not live:
            raise RuntimeError("fake Slack: no open socket to send the command on")
        self._sent[message["envelope_id"]] = time.monotonic()
        await live[-1].ws.send_str(json.dumps(message))

    async def _drop(self, how: str) -> None:
        for socket in [s for s in self._sockets if not s.ws.closed]:
            if how == "refresh":
                await socket.ws.send_str(json.dumps({"type": "disconnect", "reason": "refresh_requested"}))
            elif how == "abort":
                assert socket.request.transport is not None
                socket.request.transport.abort()
            else:
                await socket.ws.close(code=1001, message=b"going away")

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self._sockets.append(Socket(request, ws))
        self._record(lambda s: setattr(s, "connections", s.connections + 1))
        hello = {"type": "hello", "num_connections": 1, "connection_info": {"app_id": "A_MUSE"}}
        await ws.send_str(json.dumps(hello | {"debug_info": {"host": "fake", "approximate_connection_time": 3600}}))
        async for message in ws:
            if message.type != WSMsgType.TEXT:
                continue
            data = json.loads(message.data)
            envelope_id = data.get("envelope_id")
            if envelope_id in self._sent:
                ack = Ack(envelope_id, data.get("payload") or {}, time.monotonic() - self._sent[envelope_id])
                self._record(lambda s, a=ack: s.acks.__setitem__(a.envelope_id, a))
        self._record(lambda s: None)  # wake waiters: a socket closed
        return ws

    async def _params(self, request: web.Request) -> dict[str, Any]:
        params: dict[str, Any] = dict(request.query)
        if request.content_type == "application/json":
            params.update(await request.json())
        elif request.can_read_body:
            params.update(await request.post())
        return params

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params = await self._params(request)
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else params.pop("token", "")
        params.pop("token", None)
        self._record(lambda s: s.calls.append((method, params)))
        expected = self.app_token if method == "apps.connections.open" else self.bot_token
        if not token:
            return web.json_response({"ok": False, "error": "not_authed"})
        if token != expected:
            return web.json_response({"ok": False, "error": "invalid_auth"})
        handler = getattr(self, "_" + method.replace(".", "_"), None)
        if handler is None:
            return web.json_response({"ok": False, "error": "unknown_method"})
        return web.json_response(handler(params))

    def _channel(self, channel_id: str) -> Channel | None:
        return self.channels.get(channel_id)

    def _auth_test(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "url": "https://fake.slack.com/", "team": "Fake", "user": "muse", "team_id": "T_FAKE",
                "user_id": "U_MUSE", "bot_id": "B_MUSE", "is_enterprise_install": False}  # fmt: skip

    def _apps_connections_open(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "url": f"{self.url.replace('http://', 'ws://')}/link?ticket={next(self._ids)}"}

    def _conversations_info(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = self._channel(params.get("channel", ""))
        if channel is None:
            return {"ok": False, "error": "channel_not_found"}
        if channel.info_error:
            return {"ok": False, "error": channel.info_error}
        return {"ok": True, "channel": {"id": channel.id, "name": channel.name, "is_member": channel.member}}

    def _posting_error(self, channel_id: str) -> dict[str, Any] | None:
        channel = self._channel(channel_id)
        if channel is None:
            return {"ok": False, "error": "channel_not_found"}
        if not channel.member:
            return {"ok": False, "error": "not_in_channel"}
        return None

    def _chat_postEphemeral(self, params: dict[str, Any]) -> dict[str, Any]:
        error = self._posting_error(params["channel"])
        if error:
            return error
        message = {
            "via": "chat.postEphemeral",
            "channel": params["channel"],
            "user": params["user"],
            "text": params["text"],
        }
        self._record(lambda s: s.ephemerals.append(message))
        return {"ok": True, "message_ts": f"{time.time():.6f}"}

    def _chat_postMessage(self, params: dict[str, Any]) -> dict[str, Any]:
        return self._posting_error(params["channel"]) or {
            "ok": True,
            "channel": params["channel"],
            "ts": f"{time.time():.6f}",
        }

    def _files_getUploadURLExternal(self, params: dict[str, Any]) -> dict[str, Any]:
        file_id = f"F{next(self._ids):06d}"
        return {"ok": True, "upload_url": f"{self.url}/upload/{file_id}", "file_id": file_id}

    def _files_completeUploadExternal(self, params: dict[str, Any]) -> dict[str, Any]:
        error = self._posting_error(params.get("channel_id", ""))
        if error:
            return error
        files = json.loads(params["files"])
        missing = [f["id"] for f in files if f["id"] not in self.state.uploads]
        if missing:
            return {"ok": False, "error": "file_not_found"}
        share = Share(
            channel=params["channel_id"],
            comment=params.get("initial_comment", ""),
            files=[self.state.uploads[f["id"]] for f in files],
            titles=[f.get("title", "") for f in files],
        )
        self._record(lambda s: s.shares.append(share))
        return {"ok": True, "files": [{"id": f["id"], "title": f.get("title", "")} for f in files]}

    async def _upload(self, request: web.Request) -> web.Response:
        data = await request.read()
        if self.fail_uploads:
            return web.Response(status=500, text="upload failed")
        file_id = request.match_info["file_id"]
        self._record(lambda s: s.uploads.__setitem__(file_id, data))
        return web.Response(text=f"OK - {len(data)}")

    async def _respond(self, request: web.Request) -> web.Response:
        body = await request.json()
        envelope_id = request.match_info["envelope_id"]
        user = self._requesters.get(envelope_id, "")
        message = {"via": "response_url", "envelope_id": envelope_id, "user": user, **body}
        self._record(lambda s: s.ephemerals.append(message))
        return web.Response(text="ok")
