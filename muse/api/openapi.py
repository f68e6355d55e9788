"""`GET /openapi.json`, generated from the app's own routes, so a route cannot be added and left out.

Every route is documented except the pages (`PAGES`: HTML for people, whose forms are not an API).
A route gives its path, methods and path parameters; its endpoint's docstring gives the summary; the
table in `muse.api.docs` adds request and response models, statuses and errors. Schemas are the
pydantic models themselves, their definitions gathered under `components/schemas`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from starlette.convertors import FloatConvertor, IntegerConvertor
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from muse import __version__
from muse.api.docs import (  # re-exported: the response models are read from here (tests/test_fuzz.py)
    DOCS,
    ERROR_WORDS,
    Doc,
    ErrorBody,
    GenerateResponse,
    JobCreated,
    JobStatus,
)
from muse.http.auth import OPEN_PREFIXES

__all__ = ["PAGES", "ErrorBody", "GenerateResponse", "JobCreated", "JobStatus", "documented", "endpoint", "spec"]

# First path segments of the HTML pages ("" is the studio at "/") and their static files.
PAGES = frozenset({"", "jobs", "gallery", "login", "logout", "static"})
SCHEMAS = "#/components/schemas/{model}"
NO_DOC = Doc()


def documented(path: str) -> bool:
    return path.split("/")[1] not in PAGES


@dataclass(frozen=True)
class Operation:
    path: str  # in OpenAPI's template form: `{model}`, not Starlette's `{model:path}`
    method: str
    route: Route

    @property
    def doc(self) -> Doc:
        return DOCS.get(self.route.endpoint, NO_DOC)


def operations(routes: Iterable[BaseRoute], prefix: str = "") -> Iterator[Operation]:
    for route in routes:
        if isinstance(route, Mount):
            yield from operations(route.routes, prefix + route.path)
        elif isinstance(route, Route) and documented(path := prefix + route.path_format):
            # Starlette answers HEAD wherever it answers GET; HEAD says nothing GET does not.
            for method in sorted((route.methods or {"GET"}) - {"HEAD"}):
                yield Operation(path, method.lower(), route)


def summary(operation: Operation) -> str:
    docstring = inspect.getdoc(operation.route.endpoint)
    if docstring:
        return " ".join(docstring.split("\n\n")[0].split())
    return operation.doc.summary or operation.route.name.replace("_", " ").capitalize()


def parameters(route: Route) -> list[dict[str, Any]]:
    def schema(convertor: object) -> dict[str, str]:
        if isinstance(convertor, IntegerConvertor):
            return {"type": "integer"}
        return {"type": "number"} if isinstance(convertor, FloatConvertor) else {"type": "string"}

    return [
        {"name": name, "in": "path", "required": True, "schema": schema(convertor)}
        for name, convertor in route.param_convertors.items()
    ]


# Keyed by (model, mode); Any because pydantic's key also admits its dataclasses.
Refs = dict[tuple[Any, JsonSchemaMode], dict[str, Any]]


def content(media: str, schema: dict[str, Any] | None) -> dict[str, Any]:
    return {"content": {media: {"schema": schema} if schema is not None else {}}}


def operation_object(operation: Operation, refs: Refs) -> dict[str, Any]:
    doc = operation.doc
    response = refs[doc.response, "serialization"] if doc.response else None
    ok = content(doc.media, response) if response or doc.media != "application/json" else {}
    responses: dict[str, Any] = {str(doc.status): {"description": "OK", **ok}}
    responses |= {str(status): {"description": words, **ok} for status, words in doc.also.items()}
    error = content("application/json", refs[ErrorBody, "serialization"])
    is_open = operation.path.startswith(OPEN_PREFIXES)
    for status in sorted({*doc.errors, *(() if is_open else (401,))}):
        responses[str(status)] = {"description": ERROR_WORDS.get(status, "Error"), **error}
    result: dict[str, Any] = {"summary": summary(operation), "responses": responses}
    if doc.body is not None:
        result["requestBody"] = {"required": True, **content(doc.body_media, refs[doc.body, "validation"])}
    if is_open:
        result["security"] = []
    return result


def spec(routes: Iterable[BaseRoute]) -> dict[str, Any]:
    found = list(operations(routes))
    models: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {(ErrorBody, "serialization"): None}
    for operation in found:
        if operation.doc.body is not None:
            models[operation.doc.body, "validation"] = None
        if operation.doc.response is not None:
            models[operation.doc.response, "serialization"] = None
    refs, definitions = models_json_schema(list(models), ref_template=SCHEMAS)
    paths: dict[str, Any] = {}
    for operation in found:
        item = paths.setdefault(operation.path, {})
        if params := parameters(operation.route):
            item["parameters"] = params
        item[operation.method] = operation_object(operation, refs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Muse",
            "version": __version__,
            "description": "Self-hosted text-to-image service. Errors: {error: {message, type, param, code}}.",
        },
        "components": {
            "schemas": definitions.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }


async def endpoint(request: Request) -> Response:
    """This document: every JSON endpoint with its request, response and error schemas."""
    # Routes are fixed once the app is built, so the document is made once per app.
    document = getattr(request.app.state, "openapi", None)
    if document is None:
        document = request.app.state.openapi = spec(request.app.routes)
    return JSONResponse(document)
