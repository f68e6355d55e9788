#!/usr/bin/env python3
"""Smoke-test an installed `muse`: start `muse serve`, check the page, a static asset and one generation.

Called by .ci/wheel_smoke.sh with the python of a venv that has the wheel installed (stdlib only):

    python wheel_smoke.py --muse VENV/bin/muse --workdir DIR --data-dir DIR [--pidfile FILE]

The server is started from --workdir (outside the checkout, so `muse` can only come from the wheel) on a
free port, in its own process group. It is always stopped: SIGINT (muse drains, then exits 0), then
SIGKILL to the whole group if it has not exited in time. Exit status 0 when every check passed, 1 with a
message and the server's log tail otherwise.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GENERATE_BODY = {"prompt": "a red circle on a blue background", "seed": 7, "steps": 2}


class CheckFailed(Exception):
    pass


def log(msg: str) -> None:
    print(f"[wheel-smoke] {msg}", flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(
    url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 30
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body); HTTP error statuses are returned, not raised. Connection errors raise."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


class StaticRefs(HTMLParser):
    """Every href/src attribute that points under /static/."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("href", "src") and value and value.startswith("/static/") and value not in self.refs:
                self.refs.append(value)


def short(body: bytes, limit: int = 300) -> str:
    text = body.decode("utf-8", "replace")
    return text if len(text) <= limit else text[:limit] + "..."


class Server:
    def __init__(self, argv: list[str], cwd: Path, log_path: Path, pidfile: Path | None) -> None:
        self.argv, self.cwd, self.log_path, self.pidfile = argv, cwd, log_path, pidfile
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # A CI job's MUSE_* / Slack variables must not change what is tested (API keys, a model, ...).
        env = {k: v for k, v in os.environ.items() if not k.startswith("MUSE_")}
        env.pop("SLACK_APP_TOKEN", None)
        env.pop("SLACK_BOT_TOKEN", None)
        env.pop("PYTHONPATH", None)
        log(f"starting (cwd {self.cwd}): {' '.join(self.argv)}")
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the workers are stopped with it
            )
        if self.pidfile:
            self.pidfile.write_text(f"{self.proc.pid}\n")

    def exited(self) -> int | None:
        assert self.proc is not None
        return self.proc.poll()

    def stop(self, grace: float = 45.0) -> int | None:
        """SIGINT, wait up to `grace` s, then SIGKILL the group. The exit status, or None if it had to be killed."""
        if self.proc is None:
            return None
        pid = self.proc.pid
        status: int | None = self.proc.poll()
        if status is None:
            log("stopping the server (SIGINT)")
            try:
                self.proc.send_signal(signal.SIGINT)
                status = self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log(f"the server did not exit {grace:.0f} s after SIGINT: SIGKILL")
                status = None
        # Whatever is left of the group (workers of a killed server) goes now.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        if self.pidfile:
            self.pidfile.unlink(missing_ok=True)
        return status

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        return "\n".join(text[-lines:])


def wait_ready(server: Server, base: str, deadline_s: float) -> None:
    start = time.monotonic()
    last = "no answer yet"
    while time.monotonic() - start < deadline_s:
        status = server.exited()
        if status is not None:
            raise CheckFailed(f"the server exited with status {status} before /readyz was 200")
        try:
            code, _, body = request(base + "/readyz", timeout=5)
            if code == 200:
                log(f"GET /readyz: 200 after {time.monotonic() - start:.1f} s")
                return
            last = f"{code} {short(body, 120)}"
        except (OSError, urllib.error.URLError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5)
    raise CheckFailed(f"GET /readyz was not 200 within {deadline_s:.0f} s (last: {last})")


def check_page_and_static(base: str) -> None:
    code, headers, body = request(base + "/")
    ctype = headers.get("content-type", "")
    if code != 200:
        raise CheckFailed(f"GET / answered {code}, not 200: {short(body)}")
    if "text/html" not in ctype:
        raise CheckFailed(f"GET / answered Content-Type {ctype!r}, not HTML")
    log(f"GET /: 200 {ctype}, {len(body)} bytes")

    parser = StaticRefs()
    parser.feed(body.decode("utf-8", "replace"))
    if not parser.refs:
        raise CheckFailed("the page at / references no /static/ asset (href or src)")
    for ref in parser.refs:  # every referenced asset must ship in the wheel
        code, headers, asset = request(base + ref)
        if code != 200 or not asset:
            raise CheckFailed(f"GET {ref} (referenced by /) answered {code} with {len(asset)} bytes")
        log(f"GET {ref}: 200 {headers.get('content-type', '?')}, {len(asset)} bytes")


def check_generate(base: str) -> None:
    body = json.dumps(GENERATE_BODY).encode()
    t0 = time.monotonic()
    code, headers, answer = request(
        base + "/api/generate", data=body, headers={"Content-Type": "application/json"}, timeout=300
    )
    took = time.monotonic() - t0
    if code != 200:
        raise CheckFailed(f"POST /api/generate {GENERATE_BODY} answered {code}: {short(answer)}")
    try:
        doc = json.loads(answer)
        png = base64.b64decode(doc["images"][0]["png_base64"], validate=True)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise CheckFailed(
            f"POST /api/generate: no images[0].png_base64 in the answer ({type(exc).__name__}: {exc}): {short(answer)}"
        ) from exc
    if not png.startswith(PNG_SIGNATURE):
        raise CheckFailed(f"POST /api/generate: images[0] is not a PNG (starts {png[:8]!r})")
    log(f"POST /api/generate: 200 {headers.get('content-type', '?')}, a {len(png)}-byte PNG in {took:.1f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--muse", required=True, help="the installed `muse` command")
    ap.add_argument("--workdir", required=True, type=Path, help="working directory for the server")
    ap.add_argument("--data-dir", required=True, type=Path, help="the server's --data-dir")
    ap.add_argument("--pidfile", type=Path, default=None, help="where to write the server's pid (for a trap)")
    ap.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for /readyz [%(default)s]")
    args = ap.parse_args()

    # SIGTERM (a cancelled CI job) unwinds through `finally` like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    argv = [args.muse, "serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(args.data_dir)]
    server = Server(argv, args.workdir, args.workdir / "server.log", args.pidfile)
    failure: str | None = None
    try:
        server.start()
        wait_ready(server, base, args.ready_timeout)
        check_page_and_static(base)
        check_generate(base)
    except CheckFailed as exc:
        failure = str(exc)
    except Exception as exc:  # a timeout or a refused connection mid-check is a failed check too
        failure = f"{type(exc).__name__}: {exc}"
    finally:
        status = server.stop()
    if failure is None and status != 0:
        failure = (
            "the server had to be killed after SIGINT"
            if status is None
            else f"the server exited with status {status} after SIGINT (a drained exit is 0)"
        )
    if failure is not None:
        log(f"FAILED: {failure}")
        log(f"server log ({server.log_path}), last lines:")
        print(server.log_tail(), flush=True)
        return 1
    log("server stopped cleanly (status 0)")
    log("OK: /readyz, /, its static assets and one generation all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
