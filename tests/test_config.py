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
    s = Settings.from_env(
        {"SLACK_BOT_TOKEN": "xoxb-hush", "MUSE_API_KEYS": "k-hush", "MUSE_WEBHOOK_SECRET": "whsec_hush"}
    )
    assert s.slack_bot_token == "xoxb-hush" and s.webhook_secret == "whsec_hush"
    assert "hush" not in repr(s) and "***" in repr(s)


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


def test_precision_quantization_and_offload_reach_every_worker(tmp_path: Path) -> None:
    from muse.pools.factory import build_pool
    from muse.worker.main import WorkerConfig

    env = {"MUSE_DTYPE": "bfloat16", "MUSE_QUANTIZE": "int8", "MUSE_DATA_DIR": str(tmp_path), "MUSE_DEVICES": "cpu"}
    options = build_pool(Settings.from_env(env)).worker_options
    config = WorkerConfig(worker_id=1, model="m", device="cpu", threads=1, heartbeat_interval=1.0, **options)
    assert (config.dtype, config.quantize, config.offload) == ("bfloat16", "int8", "none")
    for flag, value in (("--dtype", "float8"), ("--quantize", "int4"), ("--offload", "disk")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", flag, value])


def refusal(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """What `muse serve` says when it refuses its flags before any worker starts (exit status 2)."""
    from muse.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["serve", *argv])
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1].removeprefix("muse: error: ")


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--quantize", "fp8"], "--quantize fp8 needs CUDA devices; --devices gives cpu"),
        (["--quantize", "nf4"], "--quantize nf4 needs CUDA devices; --devices gives cpu"),
        (["--offload", "model"], "--offload model needs CUDA devices; --devices gives cpu"),
        (["--offload", "sequential"], "--offload sequential needs CUDA devices; --devices gives cpu"),
    ],
)
def test_cuda_only_choices_are_refused_on_cpu_devices(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert refusal(["--devices", "cpu", *argv], capsys).startswith(said)


def test_a_missing_quantization_library_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    said = refusal(["--devices", "cpu", "--quantize", "int8"], capsys)
    assert said == "--quantize int8 needs torchao: pip install 'muse[quant]'"


def test_int8_on_cpu_is_accepted_and_a_ray_clusters_devices_are_not_guessed() -> None:
    from muse.config import check_backends

    check_backends(Settings(devices="cpu", quantize="int8"))
    check_backends(Settings(pool="ray", devices="auto", quantize="fp8", offload="model"))
    with pytest.raises(ValueError, match="--quantize fp8 needs CUDA devices; --devices gives cpu"):
        check_backends(Settings(pool="ray", devices="cpu", quantize="fp8"))


def test_compile_is_refused_at_start_up_for_a_transformer_model(
    tiny_flux_model: str, tiny_model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from muse.config import check_backends

    said = refusal(["--devices", "cpu", "--model", tiny_flux_model, "--compile"], capsys)
    assert (
        said
        == "--compile compiles UNet models only; this model's denoiser is a transformer: serve it without --compile"
    )
    check_backends(Settings(model=tiny_model, devices="cpu", compile=True))
