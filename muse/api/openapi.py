"""`GET /openapi.json`: every JSON endpoint with its request, response and error schemas.

Request schemas are the pydantic models the handlers validate with; response schemas are models
of what the handlers return, so a fuzz test can check responses against this document.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from muse import __version__
from muse.api.a1111 import PngInfoRequest, PngInfoResponse, Txt2ImgRequest, Txt2ImgResponse
from muse.api.openai import ImagesRequest, ImagesResponse
from muse.schema import GenerateBody


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


class ImageOut(BaseModel):
    png_base64: str
    seed: int


class TimingsOut(BaseModel):
    queued_ms: float
    compute_ms: float
    total_ms: float


class GenerateResponse(BaseModel):
    images: list[ImageOut]
    model: str
    steps: int
    width: int
    height: int
    batch_size: int
    timings: TimingsOut


class JobCreated(BaseModel):
    id: str
    status_url: str
    events_url: str
    seed: int


class JobStatus(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    position: int | None
    step: int | None
    steps: int
    eta_s: float | None
    prompt: str
    seed: int
    n: int
    created: float
    result: GenerateResponse | None = None
    error: ErrorDetail | None = None


class Readiness(BaseModel):
    ready: bool
    reason: str


MODELS: list[type[BaseModel]] = [
    GenerateBody, GenerateResponse, JobCreated, JobStatus, ErrorBody, Readiness,
    ImagesRequest, ImagesResponse, Txt2ImgRequest, Txt2ImgResponse, PngInfoRequest, PngInfoResponse,
]  # fmt: skip


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def json_content(model: type[BaseModel]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": ref(model)}}}


def errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Body is not JSON",
        401: "Missing or wrong API key",
        404: "Not found",
        413: "Body too large",
        422: "Invalid field (param names it)",
        429: "Rate limited (Retry-After)",
        503: "Overloaded or shutting down (Retry-After)",
        504: "Deadline passed",
    }
    return {str(c): {"description": text.get(c, "Error"), **json_content(ErrorBody)} for c in codes}


GENERATING = (400, 401, 413, 422, 429, 503, 504)


def operation(
    summary: str,
    response: type[BaseModel] | None,
    body: type[BaseModel] | None = None,
    status: int = 200,
    error_codes: tuple[int, ...] = (401,),
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": errors(*error_codes)}
    op["responses"][str(status)] = {"description": "OK", **(json_content(response) if response else {})}
    if body is not None:
        op["requestBody"] = {"required": True, **json_content(body)}
    return op


def spec() -> dict[str, Any]:
    job_id = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
    paths: dict[str, Any] = {
        "/api/generate": {
            "post": operation(
                "Generate images and wait for them", GenerateResponse, GenerateBody, error_codes=GENERATING
            )
        },
        "/api/jobs": {"post": operation("Queue a job", JobCreated, GenerateBody, 202, GENERATING)},
        "/api/jobs/{id}": {
            "parameters": job_id,
            "get": operation("Job status", JobStatus, error_codes=(401, 404)),
            "delete": operation("Cancel a job", JobStatus, error_codes=(401, 404)),
        },
        "/api/jobs/{id}/events": {
            "parameters": job_id,
            "get": {
                "summary": "Server-sent events: queued, running, progress (one per step), final state",
                "responses": {"200": {"description": "text/event-stream"}, **errors(401, 404)},
            },
        },
        "/v1/images/generations": {
            "post": operation(
                "OpenAI-compatible image generation",
                ImagesResponse,
                ImagesRequest,
                error_codes=(400, 401, 404, 413, 429, 503, 504),
            )
        },
        "/v1/models": {"get": {"summary": "The served model", "responses": {"200": {"description": "OK"}}}},
        "/sdapi/v1/txt2img": {
            "post": operation(
                "AUTOMATIC1111-compatible txt2img", Txt2ImgResponse, Txt2ImgRequest, error_codes=GENERATING
            )
        },
        "/sdapi/v1/png-info": {
            "post": operation(
                "The A1111 parameters text of a PNG, parsed",
                PngInfoResponse,
                PngInfoRequest,
                error_codes=(401, 413, 422),
            )
        },
        "/sdapi/v1/progress": {
            "get": {
                "summary": "Jobs in progress (only the caller's, with API keys)",
                "responses": {"200": {"description": "OK"}},
            }
        },
        "/sdapi/v1/interrupt": {
            "post": {"summary": "Cancel the caller's running jobs", "responses": {"200": {"description": "OK"}}}
        },
        "/sdapi/v1/skip": {
            "post": {"summary": "Cancel the caller's running jobs", "responses": {"200": {"description": "OK"}}}
        },
        "/sdapi/v1/sd-models": {"get": {"summary": "The served model", "responses": {"200": {"description": "OK"}}}},
        "/sdapi/v1/samplers": {"get": {"summary": "Supported samplers", "responses": {"200": {"description": "OK"}}}},
        "/healthz": {"get": {"summary": "Process alive", "responses": {"200": {"description": "OK"}}}},
        "/readyz": {
            "get": operation("A worker is ready", Readiness, error_codes=())
            | {
                "responses": {
                    "200": {"description": "Ready", **json_content(Readiness)},
                    "503": {"description": "Not ready", **json_content(Readiness)},
                }
            }
        },
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text/plain"}}}},
    }
    schemas: dict[str, Any] = {}
    for model in MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Muse",
            "version": __version__,
            "description": "Self-hosted text-to-image service. Errors: {error: {message, type, param, code}}.",
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }


async def endpoint(request: Request) -> Response:
    return JSONResponse(spec())
