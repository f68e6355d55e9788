"""The `muse` command: `muse serve` runs the service, `muse generate` is a client for a running one."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from muse.config import Settings, check_backends, env_names
from muse.datadir import DataDirError, DataDirLock

log = logging.getLogger("muse")


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        envs = " or ".join(env_names(f))
        default = "unset" if f.metadata.get("secret") else repr(f.default)
        if f.name == "model":
            default = "the embedded demo model"
        help_text = f"{f.metadata['help']} [env {envs}; default {default}]"
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_const", const=True, default=None, help=help_text)
            continue
        parser.add_argument(
            flag,
            type=type(f.default),
            default=None,
            choices=f.metadata.get("choices") or None,
            metavar=f.metadata.get("metavar")
            or ("{" + ",".join(f.metadata["choices"]) + "}" if f.metadata.get("choices") else f.name.upper()),
            help=help_text,
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="muse",
        description="Muse: a self-hosted text-to-image service (web page, JSON and OpenAI-style APIs, Slack).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run the server",
        description="Run the server: a pool of workers (one per device) behind a batcher and an HTTP API. "
        "Every flag can also be set with the MUSE_* environment variable shown.",
    )
    add_settings_flags(serve)
    hook = sub.add_parser(
        "webhook-secret",
        help="print the secret that signs this data dir's webhooks",
        description="Print the whsec_ secret that signs the webhooks of a server on this data dir (made once, "
        "here, if it is not there yet), for the receivers that verify them. --webhook-secret overrides it.",
    )
    hook.add_argument(
        "--data-dir", default=None, help="the server's --data-dir [env MUSE_DATA_DIR; default ./muse-data]"
    )
    gen = sub.add_parser("generate", help="generate an image on a running server", description=GENERATE_HELP)
    gen.add_argument("prompt", help="what to draw")
    gen.add_argument("-o", "--output", default=None, help="PNG file to write (default: from the prompt)")
    gen.add_argument("--url", default="http://127.0.0.1:8000", help="server URL [default %(default)s]")
    gen.add_argument(
        "--quality",
        choices=["fast", "quality"],
        default=None,
        help="the model's default steps (25 for SD) or twice that",
    )
    gen.add_argument("--steps", type=int, default=None, help="denoising steps (overrides --quality)")
    gen.add_argument("--seed", type=int, default=None, help="seed (random if absent; printed)")
    gen.add_argument("--negative", default=None, help="negative prompt")
    gen.add_argument("--guidance", type=float, default=None, help="guidance scale")
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("-n", type=int, default=None, help="number of images")
    gen.add_argument("--api-key", default=None, help="API key (or MUSE_API_KEY)")
    return parser


GENERATE_HELP = "Submit a job to a running Muse server, show its progress, and write the PNG(s)."


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)}
    return Settings.from_env(**overrides)


def check_webhooks(settings: Settings) -> None:
    """Refuse, in one line naming the flag, a webhook secret or allow-list no delivery could use."""
    from muse.core.destinations import Allowlist
    from muse.core.webhooks import parse_secret

    if settings.webhook_secret:
        try:
            parse_secret(settings.webhook_secret)
        except ValueError as exc:
            raise ValueError(f"--webhook-secret: {exc}") from None
    try:
        Allowlist.parse(settings.webhook_allow_hosts)
    except ValueError as exc:
        raise ValueError(f"--webhook-allow-hosts: {exc}") from None


def serve(settings: Settings) -> int:
    from muse.app import create_app
    from muse.server import DrainingServer, raise_fd_limit, uvicorn_config

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    files = raise_fd_limit()
    log.debug("open files limit: %d", files)
    data_dir = Path(settings.data_dir)
    if not settings.no_gallery and data_dir.is_dir() and not os.access(data_dir, os.W_OK | os.X_OK):
        log.warning("data dir %s is read-only: generated images are not stored (as with --no-gallery)", data_dir)
        settings = dataclasses.replace(settings, no_gallery=True)
    lock = DataDirLock(data_dir)
    try:
        if not settings.no_gallery:
            lock.acquire()
        app = create_app(settings)
    except (DataDirError, OSError, ValueError) as exc:
        print(f"muse serve: error: {exc}", file=sys.stderr)
        return 2
    try:
        DrainingServer(uvicorn_config(app, settings), app.state.muse).run()
    finally:
        lock.release()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            settings = settings_from_args(args)
            check_backends(settings)
            check_webhooks(settings)
            if settings.pool == "ray" and importlib.util.find_spec("ray") is None:
                raise ValueError("--pool ray needs Ray: pip install 'muse[ray]'")
        except ValueError as exc:
            parser.error(str(exc))
        return serve(settings)
    if args.command == "webhook-secret":
        from muse.core.webhooks import load_secret

        data_dir = args.data_dir or Settings.from_env().data_dir
        print(load_secret(Path(data_dir)))
        return 0
    if args.command == "generate":
        from muse.client import generate

        return generate(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
