"""A durable job's request, result and error as JSON, for the job store's rows.

JSON rather than pickle: the rows outlive the code that wrote them (an upgrade between a crash and the restart),
and a row must never be able to run code when it is read back.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from muse.errors import MuseError
from muse.messages import GeneratedImage, GenerateRequest, GenerateResult, LoraUse, SourceImage, Timings


def request_to_json(request: GenerateRequest) -> str:
    data: dict[str, Any] = {
        "prompt": request.prompt,
        "seed": request.seed,
        "steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "width": request.width,
        "height": request.height,
        "n": request.n,
        "negative_prompt": request.negative_prompt,
        "timeout_s": request.timeout_s,
        "scheduler": request.scheduler,
        "loras": [[use.name, use.scale] for use in request.loras],
    }
    source = request.source
    if source is not None:
        data["source"] = {
            "image": base64.b64encode(source.image).decode(),
            "strength": source.strength,
            "mask": None if source.mask is None else base64.b64encode(source.mask).decode(),
            "flow": source.flow,
        }
    return json.dumps(data)


def request_from_json(text: str) -> GenerateRequest:
    data = json.loads(text)
    source = data.pop("source", None)
    loras = tuple(LoraUse(name, float(scale)) for name, scale in data.pop("loras", []))
    return GenerateRequest(
        **data,
        loras=loras,
        source=None
        if source is None
        else SourceImage(
            image=base64.b64decode(source["image"]),
            strength=source["strength"],
            mask=None if source["mask"] is None else base64.b64decode(source["mask"]),
            flow=source["flow"],
        ),
    )


def error_to_json(error: MuseError | None) -> str | None:
    if error is None:
        return None
    return json.dumps(error.to_dict()["error"] | {"status": error.status})


def error_from_json(text: str | None) -> MuseError | None:
    """The error as the client saw it (message, type, param, code, status); its class is not kept, and nothing
    needs it once the job has ended."""
    if text is None:
        return None
    data = json.loads(text)
    error = MuseError(data["message"], param=data.get("param"), code=data.get("code"))
    error.status = int(data.get("status", 500))
    error.type = str(data.get("type", MuseError.type))
    return error


def result_to_json(result: GenerateResult, image_ids: list[str]) -> str:
    """What a restart needs to give the result back: its figures, and its images as gallery ids (the PNGs
    themselves are the gallery's files)."""
    t = result.timings
    return json.dumps(
        {
            "model": result.model,
            "steps": result.steps,
            "width": result.width,
            "height": result.height,
            "batch_size": result.batch_size,
            "timings": [t.queued_ms, t.compute_ms, t.total_ms],
            "seeds": [image.seed for image in result.images],
            "images": image_ids,
        }
    )


def result_from_json(text: str, request: GenerateRequest, pngs: list[bytes]) -> GenerateResult:
    data = json.loads(text)
    queued, compute, total = data["timings"]
    return GenerateResult(
        images=[GeneratedImage(png, seed) for png, seed in zip(pngs, data["seeds"], strict=False)],
        model=data["model"],
        steps=data["steps"],
        width=data["width"],
        height=data["height"],
        batch_size=data["batch_size"],
        timings=Timings(queued, compute, total),
        request=request,
    )


def image_ids(text: str | None) -> list[str]:
    return list(json.loads(text)["images"]) if text else []
