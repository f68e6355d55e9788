"""LitServe serving the same diffusers pipeline with its own batching, for benchmarks/compare.py.

    python benchmarks/peers/litserve_server.py --model DIR --port 8001 --max-batch-size 8 --batch-timeout 0.01

Same pipeline code as a Muse worker (load, one generator per image, PNG encoding), so the comparison
measures the serving layers. Request/response shapes mirror Muse's /api/generate.
"""

from __future__ import annotations

import argparse
import base64
from typing import Any

import litserve as ls


class DiffusionAPI(ls.LitAPI):
    def __init__(self, model: str, threads: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.threads = threads

    def setup(self, device: str) -> None:
        import torch

        from muse.worker.heap import keep_freed_memory
        from muse.worker.pipeline import load_pipeline, warm_up

        torch.set_num_threads(self.threads)
        # As a Muse worker does, so the comparison is of the serving layers, not of malloc's luck.
        keep_freed_memory()
        self.loaded = load_pipeline(self.model, "cpu")
        warm_up(self.loaded)

    # No annotation on `request`: LitServe builds its FastAPI route from it, and a dict type would
    # become a required query parameter.
    def decode_request(self, request):
        return request

    def predict(self, batch: Any) -> Any:
        """LitServe's batch, run as one pipeline call per distinct (steps, guidance): a diffusers call
        takes one of each, so requests that differ cannot share it (as in Muse's `--batching request`)."""
        from muse.messages import Assignment, BatchKey, ImageSpec
        from muse.worker.pipeline import run_batch

        items = batch if isinstance(batch, list) else [batch]
        seeds = [int(item.get("seed", i)) for i, item in enumerate(items)]
        keys = [
            (int(item.get("steps", 25)), float(item.get("guidance_scale", self.loaded.guidance_scale)))
            for item in items
        ]
        groups: dict[tuple[int, float], list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        pngs: list[bytes] = [b""] * len(items)
        for (steps, guidance), members in groups.items():
            job = Assignment(
                "litserve",
                [ImageSpec(items[i]["prompt"], "", seeds[i]) for i in members],
                BatchKey(self.loaded.width, self.loaded.height, steps, guidance),
            )
            for i, png in zip(members, run_batch(self.loaded, job, lambda step: True) or [], strict=True):
                pngs[i] = png
        outputs: list[dict[str, Any]] = [
            {"png": png, "seed": seed, "batch_size": len(groups[key])}
            for png, seed, key in zip(pngs, seeds, keys, strict=True)
        ]
        return outputs if isinstance(batch, list) else outputs[0]

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        png = base64.b64encode(output["png"]).decode()
        return {"images": [{"png_base64": png, "seed": output["seed"]}], "batch_size": output["batch_size"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0, help="LitServe's request timeout (Muse's is 300 s)")
    args = parser.parse_args()
    api = DiffusionAPI(args.model, args.threads, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=args.timeout)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False, num_api_servers=1)


if __name__ == "__main__":
    main()
