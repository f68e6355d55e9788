"""Settings: one frozen dataclass, filled from CLI flags and `MUSE_*` environment variables.

Each field's metadata carries its help text, so `muse serve --help` and the README table are generated
from one place. Precedence: CLI flag > environment variable > default.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

LOOPBACK = {"localhost", "127.0.0.1", "::1", "[::1]"}
EMBEDDED_MODEL = str(Path(__file__).parent / "demo_model" / "pipeline")


def _opt(
    default: Any,
    help: str,
    *,
    metavar: str | None = None,
    env: str | None = None,
    secret: bool = False,
    choices: tuple[str, ...] = (),
) -> Any:
    meta = {"help": help, "metavar": metavar, "env": env, "secret": secret, "choices": choices}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    model: str = _opt(EMBEDDED_MODEL, "Local diffusers pipeline folder or hub id. Default: the embedded demo model.")
    devices: str = _opt("auto", "'auto' (every CUDA GPU, else cpu) or a list such as 'cuda:0,cuda:1' or 'cpu,cpu'.")
    host: str = _opt("127.0.0.1", "Address to listen on (0.0.0.0 to serve the network).")
    port: int = _opt(8000, "Port to listen on (0 picks a free one).")
    max_batch_size: int = _opt(8, "Most images a worker runs at once (a request for n images takes n slots).")
    batching: str = _opt(
        "auto",
        "step: requests join and leave a running batch between denoising steps (Stable Diffusion 1.x/2.x and "
        "XL pipelines); request: whole pipeline calls per batch (any pipeline); auto: step where the model "
        "supports it.",
        choices=("auto", "step", "request"),
    )
    max_wait_ms: float = _opt(
        10.0,
        "With --batching request: most ms a part-full batch waits for company (workers busy, or a finished "
        "batch's clients resending).",
    )
    threads_per_worker: int = _opt(0, "Torch threads per CPU worker (0 = CPU cores / CPU workers).")
    pool: str = _opt(
        "local",
        "local: one worker subprocess per device on this machine; ray: workers are Ray actors on any node of "
        "the cluster at --ray-address (pip install 'muse[ray]').",
        choices=("local", "ray"),
    )
    ray_address: str = _opt(
        "auto",
        "With --pool ray: the cluster to join ('auto': the one `ray start` runs on this machine; or host:port). "
        "--devices then names the kind of each worker (cpu or cuda; auto: cuda when the cluster has GPUs), "
        "--max-workers how many, --threads-per-worker the CPUs a CPU worker asks for.",
    )
    max_side: int = _opt(0, "Widest and tallest image a request may ask for, in pixels (0 = twice the model's native).")
    max_pixels: int = _opt(
        0, "Most pixels one request may ask for, width x height x n (0 = two images of --max-side squared)."
    )
    max_steps: int = _opt(
        0, "Most denoising steps one request may ask for, at most 150 (0 = the model's muse.json max_steps, else 150)."
    )
    max_upload: int = _opt(
        8 << 20, "Most bytes of one picture a request starts from (init_image, mask_image, an edit's image)."
    )
    lora_dir: str = _opt(
        "",
        "Folder of LoRA adapters (.safetensors, diffusers/PEFT or kohya/A1111 layout) requests may name; files "
        "added later are found without a restart. Off if empty.",
        metavar="DIR",
    )
    lora_cache: int = _opt(8, "LoRA adapters each worker keeps loaded (least recently used unloaded first).")
    max_loras_per_request: int = _opt(4, "Most LoRA adapters one request may name.")
    max_queue: int = _opt(256, "Most images waiting; beyond it requests get 503 with Retry-After.")
    request_timeout: float = _opt(300.0, "Seconds a request may take, queue included (504 after).")
    job_ttl: float = _opt(600.0, "Seconds a finished job stays readable at /api/jobs/{id}.")
    worker_timeout: float = _opt(
        60.0, "A busy worker whose batch makes no step for this long is hung: killed, its batch retried."
    )
    compile: bool = _opt(
        False,
        "Compile each step worker's UNet (torch.compile, channels-last, fused QKV) and VAE decoder: UNet calls "
        "are padded to a few batch sizes, each compiled before the worker is ready (minutes on a CPU; /readyz "
        "says how far); other shapes run eager. Off by default.",
    )
    compile_mode: str = _opt(
        "default",
        "With --compile: torch.compile's mode. reduce-overhead adds CUDA graphs (the padded batch sizes keep "
        "their shapes static); the max-autotune modes search kernels longer at start-up.",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    )
    compile_cache: str = _opt(
        "", "Folder for compiled kernels, kept across restarts (default <data-dir>/compile-cache)."
    )
    gpu_memory_fraction: float = _opt(
        0.9,
        "With --compile on CUDA: a batch size whose warm-up peaks above this share of the GPU's memory is "
        "dropped, with every larger one, and the worker takes fewer images at once.",
    )
    dtype: str = _opt(
        "auto",
        "Precision of the weights. auto: on CUDA, bfloat16 for transformer models (FLUX, SD3, PixArt, …) and "
        "float16 for UNet models (SD 1.x/2.x, SDXL); elsewhere float32.",
        choices=("auto", "bfloat16", "float16", "float32"),
    )
    quantize: str = _opt(
        "none",
        "Quantize the denoiser (the UNet or transformer; text encoders and VAE keep --dtype) as it loads, with "
        "diffusers' quantization configs: int8 = torchao int8 weight-only (CPU or CUDA), fp8 = torchao float8 "
        "weight-only (CUDA), nf4 = bitsandbytes 4-bit NF4 (CUDA). Needs pip install 'muse[quant]'.",
        choices=("none", "int8", "fp8", "nf4"),
    )
    offload: str = _opt(
        "none",
        "Keep the weights in CPU memory and move them to the GPU as they run (CUDA only; needs accelerate): model "
        "= whole parts at a time (about the memory of the largest part, a little slower), sequential = layer by "
        "layer (least GPU memory, much slower).",
        choices=("none", "model", "sequential"),
    )
    progress_interval: float = _opt(
        0.1,
        "Seconds between a worker's progress reports while it runs (0 = every denoising step). Each report "
        "costs the server some CPU that a busy CPU worker would otherwise use.",
    )
    interrupt_grace: float = _opt(
        5.0,
        "Seconds (beyond two measured steps) a worker gets to stop a batch whose requests all expired or "
        "were cancelled, before it is killed and replaced.",
    )
    max_retries: int = _opt(1, "Times a batch is retried on another worker after its worker died.")
    min_workers: int = _opt(-1, "Fewest workers kept running (0 = scale to zero; -1 = every device).")
    max_workers: int = _opt(0, "Most workers (0 = one per device; never more than the devices).")
    scale_interval: float = _opt(1.0, "Seconds between autoscaler decisions.")
    upscale_delay: float = _opt(0.0, "Seconds demand must exceed capacity before a worker is added.")
    downscale_delay: float = _opt(60.0, "Seconds a worker must be surplus before it is drained.")
    drain_timeout: float = _opt(30.0, "On shutdown, seconds accepted requests get to finish.")
    log_level: str = _opt("info", "debug, info, warning or error.")
    data_dir: str = _opt(
        "./muse-data",
        "Folder for the gallery (PNG files and a SQLite index), the durable jobs of /api/jobs and their webhooks.",
    )
    no_gallery: bool = _opt(
        False, "Do not store generated images (then jobs live in memory only, and take no webhook_url)."
    )
    slack_app_token: str = _opt(
        "", "Slack app-level token (xapp-...) for socket mode.", env="SLACK_APP_TOKEN", secret=True
    )
    slack_bot_token: str = _opt("", "Slack bot token (xoxb-...).", env="SLACK_BOT_TOKEN", secret=True)
    slack_max_jobs_per_user: int = _opt(2, "Most unfinished /muse jobs per Slack user.")
    api_keys: str = _opt(
        "",
        "Comma-separated API keys, or @file with one per line; when set, generating and reading images "
        "needs 'Authorization: Bearer <key>'.",
        secret=True,
    )
    admin_keys: str = _opt(
        "",
        "Comma-separated admin keys, or @file: API keys that see and delete every key's jobs and images.",
        secret=True,
    )
    session_ttl: float = _opt(7 * 86400.0, "Seconds a browser stays signed in (with --api-keys).")
    rate_limit: float = _opt(
        0.0,
        "Images per minute per API key (per client address without keys), counted as native-size 25-step "
        "images (a 50-step image counts 2); 0 = off.",
    )
    public_metrics: bool = _opt(False, "Serve /metrics without an API key.")
    max_connections: int = _opt(1000, "Most open connections; beyond it new requests get 503 (0 = no limit).")
    header_timeout: float = _opt(10.0, "Seconds a client has to send a request's headers before it is cut off.")
    body_timeout: float = _opt(10.0, "Seconds a request's body may pause between two chunks before it is cut off.")
    forwarded_allow_ips: str = _opt(
        "",
        "Comma-separated addresses of trusted proxies whose X-Forwarded-For/-Proto are believed "
        "(* = any); empty = none, so clients cannot pick the address they are rate-limited as.",
    )
    allowed_hosts: str = _opt(
        "",
        "Comma-separated Host names the server answers to (others get 400; * = any). Empty: the bound "
        "address's names (localhost, 127.0.0.1 and [::1] on loopback; any host when bound to 0.0.0.0).",
    )
    public_url: str = _opt(
        "",
        "The server's address as clients reach it (e.g. https://muse.example), for image links; empty: the "
        "address each request was sent to.",
    )
    link_ttl: float = _opt(3600.0, "Seconds an image link (OpenAI response_format url) stays valid.")
    cors_origins: str = _opt("", "Comma-separated origins allowed by CORS (e.g. https://app.example); off if empty.")
    webhook_secret: str = _opt(
        "",
        "Secret (whsec_...) that signs webhooks; empty: the one made once in the data dir (muse webhook-secret "
        "prints it).",
        secret=True,
    )
    webhook_retry_for: float = _opt(86400.0, "Seconds a webhook event is retried before it is given up.")
    webhook_first_retry: float = _opt(
        2.0,
        "Seconds before a failed webhook is retried the first time; the gaps then double, up to 30 times this "
        "in the first 1,800 times this (2: a minute, for an hour), 1,800 times it later (2: an hour).",
    )
    webhook_allow_hosts: str = _opt(
        "",
        "Comma-separated host names, addresses or networks (e.g. 10.0.0.0/8) webhooks may go to although they "
        "are loopback, private or link-local; others are refused (422 naming webhook_url).",
    )

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ValueError("--gpu-memory-fraction must be more than 0 and at most 1")
        if self.progress_interval < 0:
            raise ValueError("--progress-interval must be 0 or more seconds")
        if self.webhook_first_retry <= 0 or self.webhook_retry_for < 0:
            raise ValueError("--webhook-first-retry must be more than 0 seconds, --webhook-retry-for 0 or more")
        if self.lora_cache < 1 or self.max_loras_per_request < 1:
            raise ValueError("--lora-cache and --max-loras-per-request must be at least 1")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, overridden by `MUSE_<FIELD>` variables, overridden by `overrides`."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(env_name(f.name))
            if raw is None and f.metadata.get("env"):
                raw = env.get(f.metadata["env"])
            if raw is not None and raw != "":
                values[f.name] = parse_value(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def host_names(self) -> list[str]:
        """What --allowed-hosts means: the names given, or those of the address bound, and the host of
        --public-url (the name a proxy in front passes on)."""
        given = [h.strip() for h in self.allowed_hosts.split(",") if h.strip()]
        if given:
            return given
        public = urlsplit(self.public_url).hostname if self.public_url else None
        if self.host in ("0.0.0.0", "::", ""):
            return ["*"]  # every address of the machine: its names are not known here
        names = sorted(LOOPBACK) if self.host in LOOPBACK else [self.host]
        return [*names, public] if public and public not in names else names

    def public_origin(self) -> str | None:
        """--public-url's origin (scheme://host[:port]), which the CSRF check treats as this server."""
        if not self.public_url:
            return None
        parts = urlsplit(self.public_url)
        return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else None

    def device_list(self) -> list[str]:
        return resolve_devices(self.devices)

    def __repr__(self) -> str:
        # Secrets never reach a log line through a repr.
        shown = {
            f.name: ("***" if f.metadata.get("secret") and getattr(self, f.name) else getattr(self, f.name))
            for f in dataclasses.fields(self)
        }
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


# What --quantize and --offload need: the libraries (all in the `quant` extra), and whether only CUDA runs them.
BACKENDS: dict[tuple[str, str], tuple[tuple[str, ...], bool]] = {
    ("quantize", "int8"): (("torchao", "accelerate"), False),
    ("quantize", "fp8"): (("torchao", "accelerate"), True),
    ("quantize", "nf4"): (("bitsandbytes", "accelerate"), True),
    ("offload", "model"): (("accelerate",), True),
    ("offload", "sequential"): (("accelerate",), True),
}


def check_backends(settings: Settings) -> None:
    """Refuse, in one line naming the flag, what no worker could load: a missing library, a CUDA-only
    choice on a device that is not CUDA, --compile on a transformer model (read from its folder). Also
    checks --devices. A Ray pool's 'auto' kind is not known here, nor the libraries of its nodes."""
    from importlib.util import find_spec

    local = settings.pool != "ray"
    devices = settings.device_list() if local or settings.devices.strip() != "auto" else []
    for (name, value), (libraries, cuda_only) in BACKENDS.items():
        if getattr(settings, name) != value:
            continue
        flag = f"--{name} {value}"
        other = sorted({d for d in devices if d != "auto" and not d.startswith("cuda")})
        if cuda_only and other:
            raise ValueError(f"{flag} needs CUDA devices; --devices gives {', '.join(other)}")
        missing = [lib for lib in libraries if local and find_spec(lib) is None]
        if missing:
            raise ValueError(f"{flag} needs {' and '.join(missing)}: pip install 'muse[quant]'")
    if settings.lora_dir:
        if not Path(settings.lora_dir).is_dir():
            raise ValueError(f"--lora-dir {settings.lora_dir}: not a folder")
        if settings.compile:
            raise ValueError("--lora-dir with --compile: a compiled UNet would not see the adapters; choose one")
        if local and find_spec("peft") is None:
            raise ValueError("--lora-dir needs peft: pip install peft")
    if settings.compile and denoiser_of(settings.model) == "transformer":
        raise ValueError(
            "--compile compiles UNet models only; this model's denoiser is a transformer: serve it without --compile"
        )


def denoiser_of(model: str) -> str | None:
    """'transformer' or 'unet', as the folder's model_index.json says; None when it cannot tell (a hub id)."""
    import json

    try:
        index = json.loads((Path(model) / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    for name in ("transformer", "unet"):
        entry = index.get(name) if isinstance(index, dict) else None
        if isinstance(entry, list) and all(entry):
            return name
    return None


def env_name(field_name: str) -> str:
    return "MUSE_" + field_name.upper()


def env_names(f: dataclasses.Field[Any]) -> list[str]:
    """The variables a field reads, in order of precedence."""
    return [env_name(f.name)] + ([f.metadata["env"]] if f.metadata.get("env") else [])


def parse_value(f: dataclasses.Field[Any], raw: str) -> Any:
    # Every Settings field has a default, so f.default is never dataclasses.MISSING here.
    kind: type[Any] = type(f.default)
    if kind is bool:
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    try:
        value = kind(raw)
    except ValueError as exc:
        raise ValueError(f"{env_name(f.name)}={raw!r} is not a valid {kind.__name__}") from exc
    if f.metadata.get("choices") and value not in f.metadata["choices"]:
        raise ValueError(f"{env_name(f.name)}={raw!r} is not one of {', '.join(f.metadata['choices'])}")
    return value


def resolve_devices(spec: str) -> list[str]:
    """Turn `--devices` into one entry per worker slot; a device may repeat (`cpu,cpu`)."""
    spec = spec.strip()
    if spec == "auto":
        try:
            import torch  # only here: config stays importable without loading torch eagerly

            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except ImportError:
            count = 0
        return [f"cuda:{i}" for i in range(count)] or ["cpu"]
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if not devices:
        raise ValueError("--devices is empty")
    for d in devices:
        if not (d == "cpu" or d == "cuda" or d.startswith("cuda:") or d == "mps"):
            raise ValueError(f"--devices: unknown device {d!r} (use cpu, cuda:N or mps)")
    return devices
