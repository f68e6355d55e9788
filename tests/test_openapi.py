"""`/openapi.json` is made from the app's routes: every JSON route has its entry, and the document holds together."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from muse.api.openapi import spec
from muse.app import create_app
from muse.config import EMBEDDED_MODEL
from tests.serving import live_server, settings

KEY = "sk-openapi-test"
# The JSON API as design.md names it; everything outside it and outside the pages must be documented too.
JSON_PREFIXES = ("/api/", "/v1/", "/sdapi/")
JSON_PATHS = {"/healthz", "/readyz", "/metrics", "/openapi.json"}
PAGE_ROOTS = {"", "jobs", "gallery", "login", "logout", "static"}
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture(scope="module")
def app() -> Starlette:
    # Building the app loads no model and starts nothing: the routes are all this needs.
    return create_app(settings(EMBEDDED_MODEL, no_gallery=True))


@pytest.fixture(scope="module")
def doc(app: Starlette) -> dict[str, Any]:
    return spec(app.routes)


def routed(routes: list[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(path template, method) for everything the app answers; HEAD is GET's shadow."""
    for route in routes:
        if isinstance(route, Mount):
            yield from routed(route.routes, prefix + route.path)
        elif isinstance(route, Route):
            for method in route.methods or ():
                if method != "HEAD":
                    yield prefix + route.path_format, method.lower()


def entries(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, method) for path, item in doc["paths"].items() for method in item if method in METHODS}


def test_every_json_route_of_the_app_has_an_entry(app: Starlette, doc: dict[str, Any]) -> None:
    json_routes = {(p, m) for p, m in routed(app.routes) if p.startswith(JSON_PREFIXES) or p in JSON_PATHS}
    # The walk must see the routes that were once forgotten, or an empty walk would pass.
    assert {("/v1/models/{model}", "get"), ("/sdapi/v1/options", "get"), ("/sdapi/v1/loras", "get")} <= json_routes
    assert json_routes - entries(doc) == set()


def test_only_the_pages_are_left_out_and_nothing_is_invented(app: Starlette, doc: dict[str, Any]) -> None:
    answered = set(routed(app.routes))
    assert entries(doc) <= answered, "an entry for a route the app does not have"
    left_out = {path for path, _ in answered - entries(doc)}
    assert {path.split("/")[1] for path in left_out} <= PAGE_ROOTS, left_out
    assert "/" in left_out and "/login" in left_out


def test_a_new_route_is_documented_without_being_listed(app: Starlette) -> None:
    async def reindex(request: Request) -> Response:
        """Rebuild the index of every stored image."""
        return JSONResponse({})

    async def tally(request: Request) -> Response:
        return JSONResponse({})

    extra = [
        Route("/v1/reindex", reindex, methods=["PUT"]),
        Mount("/sdapi/v2", routes=[Route("/tally/{day:int}", tally)]),
        Route("/gallery/{id}/rotate", tally, methods=["POST"]),  # a page: left out by the same rule as the others
    ]
    doc = spec([*app.routes, *extra])
    assert entries(doc) - entries(spec(app.routes)) == {("/v1/reindex", "put"), ("/sdapi/v2/tally/{day}", "get")}
    assert doc["paths"]["/v1/reindex"]["put"]["summary"] == "Rebuild the index of every stored image."
    assert doc["paths"]["/sdapi/v2/tally/{day}"]["parameters"] == [
        {"name": "day", "in": "path", "required": True, "schema": {"type": "integer"}}
    ]
    assert "401" in doc["paths"]["/v1/reindex"]["put"]["responses"], "a guarded route says it needs a key"


def test_request_bodies_are_the_models_the_handlers_validate_with(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    bodies = {
        ("/api/generate", "post"): "GenerateBody",
        ("/api/jobs", "post"): "JobBody",
        ("/v1/images/generations", "post"): "ImagesRequest",
        ("/sdapi/v1/txt2img", "post"): "Txt2ImgRequest",
        ("/sdapi/v1/png-info", "post"): "PngInfoRequest",
    }
    for (path, method), model in bodies.items():
        body = doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}, path
    assert {"prompt", "seed", "scheduler"} <= set(schemas["GenerateBody"]["properties"])
    assert {"prompt", "webhook_url"} <= set(schemas["JobBody"]["properties"])
    assert schemas["GenerateBody"]["additionalProperties"] is False, "the strict body refuses unknown fields"
    error = doc["paths"]["/api/generate"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorBody"}
    assert set(schemas["ErrorDetail"]["properties"]) == {"message", "type", "param", "code"}


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def test_the_document_is_well_formed_openapi_3_1(doc: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    assert doc["openapi"].startswith("3.1.") and doc["info"]["title"] and doc["info"]["version"]
    assert doc["security"] == [{"bearer": []}] and "bearer" in doc["components"]["securitySchemes"]
    schemas = doc["components"]["schemas"]
    for ref in refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    for name, schema in schemas.items():
        # OpenAPI 3.1's Schema Object is JSON Schema 2020-12.
        jsonschema.Draft202012Validator.check_schema(schema)
        assert "$defs" not in schema, f"{name}: definitions belong under components/schemas"
    for path, item in doc["paths"].items():
        assert path.startswith("/") and ":" not in path, path
        declared = {p["name"] for p in item.get("parameters", []) if p["in"] == "path"}
        assert declared == set(re.findall(r"{([^}]+)}", path)), path
        assert all(p["required"] is True for p in item.get("parameters", [])), path
        operations = {m: op for m, op in item.items() if m in METHODS}
        assert operations and set(item) <= METHODS | {"parameters"}, path
        for method, operation in operations.items():
            assert operation["summary"].strip(), (path, method)
            assert operation["responses"], (path, method)
            for status, response in operation["responses"].items():
                assert re.fullmatch(r"[1-5]\d\d", status) and response["description"], (path, method, status)


def test_the_served_document_is_the_apps_and_says_which_routes_need_a_key() -> None:
    with live_server(settings(EMBEDDED_MODEL, api_keys=KEY, min_workers=0, no_gallery=True), ready=False) as server:
        served = httpx.get(server.url + "/openapi.json")
        assert served.status_code == 200, "the document is open"
        doc = served.json()
        assert entries(doc) >= {("/api/generate", "post"), ("/sdapi/v1/schedulers", "get")}
        for path, item in doc["paths"].items():
            if "get" not in item or "{" in path:
                continue
            answer = httpx.get(server.url + path)
            if item["get"].get("security") == []:
                assert answer.status_code != 401, f"{path} is documented as open"
            else:
                assert answer.status_code == 401, f"{path} is documented as needing a key"
                assert "401" in item["get"]["responses"], path
