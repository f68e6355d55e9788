from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from muse.cli import build_parser, settings_from_args
from muse.config import EMBEDDED_MODEL, Settings, resolve_devices


def test_defaults_serve_the_embedded_model_on_port_8000() -> None:
    s = Settings.from_env({})
    assert s.model == EMBEDDED_MODEL and s.port == 8000 and s.max_batch_size == 8 and s.max_wait_ms == 10


def test_flag_beats_environment_beats_default() -> None:
    env = {"MUSE_PORT": "9000", "MUSE_MAX_BATCH_SIZE": "4", "MUSE_NO_GALLERY": "true"}
    assert Settings.from_env(env).port == 9000
    args = build_parser().parse_args(["serve", "--port", "9100"])
    import os

    old = dict(os.environ)
    try:
        os.environ.update(env)
        s = settings_from_args(args)
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert (s.port, s.max_batch_size, s.no_gallery) == (9100, 4, True)


def test_slack_tokens_also_come_from_the_usual_variables_and_never_show_in_repr() -> None:
    s = Settings.from_env({"SLACK_BOT_TOKEN": "xoxb-secret", "MUSE_API_KEYS": "k-secret"})
    assert s.slack_bot_token == "xoxb-secret"
    assert "secret" not in repr(s) and "***" in repr(s)


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ValueError, match="MUSE_PORT"):
        Settings.from_env({"MUSE_PORT": "eighty"})


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("cpu", ["cpu"]), ("cpu,cpu", ["cpu", "cpu"]), (" cuda:0 , cuda:1 ", ["cuda:0", "cuda:1"])],
)
def test_devices(spec: str, expected: list[str]) -> None:
    assert resolve_devices(spec) == expected


@pytest.mark.parametrize("spec", ["", "gpu", "cpu,tpu:0"])
def test_bad_devices_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        resolve_devices(spec)


def test_auto_devices_without_a_gpu_is_cpu() -> None:
    assert resolve_devices("auto") == ["cpu"]


def test_readme_documents_every_flag() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for f in dataclasses.fields(Settings):
        assert f"--{f.name.replace('_', '-')}" in readme, f.name


@pytest.mark.parametrize(
    ("host", "allowed", "public_url", "names"),
    [
        ("127.0.0.1", "", "", ["127.0.0.1", "::1", "[::1]", "localhost"]),
        ("127.0.0.1", "", "https://muse.example/base", ["127.0.0.1", "::1", "[::1]", "localhost", "muse.example"]),
        ("10.1.2.3", "", "", ["10.1.2.3"]),
        ("0.0.0.0", "", "https://muse.example", ["*"]),
        ("0.0.0.0", "muse.lan, 192.168.1.20", "", ["muse.lan", "192.168.1.20"]),
    ],
)
def test_allowed_hosts_default_to_the_bound_names_and_the_public_url(
    host: str, allowed: str, public_url: str, names: list[str]
) -> None:
    settings = Settings(host=host, allowed_hosts=allowed, public_url=public_url)
    assert settings.host_names() == names


def test_compile_options_reach_every_worker_and_a_bad_mode_is_refused(tmp_path: Path) -> None:
    from muse.pools.factory import build_pool
    from muse.worker.main import WorkerConfig

    env = {"MUSE_COMPILE": "true", "MUSE_COMPILE_MODE": "reduce-overhead", "MUSE_DATA_DIR": str(tmp_path)}
    options = build_pool(Settings.from_env(env)).worker_options
    config = WorkerConfig(worker_id=1, model="m", device="cpu", threads=1, heartbeat_interval=1.0, **options)
    assert (config.compile, config.compile_mode) == (True, "reduce-overhead")
    assert config.compile_cache == str(tmp_path / "compile-cache")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--compile-mode", "fastest"])
