"""Rendering for the HTMX pages: the Jinja environment, full page or fragment, and small formatting helpers."""

from __future__ import annotations

import datetime as dt
import functools
import logging
import re
import unicodedata
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from muse.errors import InvalidRequest, MuseError, NotFound
from muse.http.auth import viewer_of
from muse.http.common import service
from muse.messages import LoraUse
from muse.storage import Gallery
from muse.web.assets import HTMX_CDN, HTMX_INTEGRITY, HTMX_VERSION, SSE_CDN, SSE_INTEGRITY, TEMPLATES_DIR
from muse.web.forms import FormValues, problem, sampler_options, size_options

log = logging.getLogger("muse.pages")

RECENT = 8  # thumbnails of the latest images under the studio's form
Handler = Callable[[Request], Awaitable[Response]]


def duration(ms: float | None) -> str:
    if ms is None:
        return ""
    if ms < 1000:
        return f"{ms:.0f} ms"
    seconds = ms / 1000
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds // 60:.0f} min {seconds % 60:.0f} s"


def eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 1:
        return "less than a second"
    if seconds < 90:
        return f"about {seconds:.0f} s"
    return f"about {seconds / 60:.0f} min"


def timestamp(created: float) -> str:
    return dt.datetime.fromtimestamp(created).strftime("%Y-%m-%d %H:%M")


def iso_time(created: float) -> str:
    return dt.datetime.fromtimestamp(created, dt.UTC).isoformat(timespec="seconds")


def download_name(prompt: str, seed: int) -> str:
    """`a-red-fox-in-the-snow-1234.png`: the first words of the prompt, then the seed."""
    text = unicodedata.normalize("NFKC", prompt).lower()
    words = re.findall(r"\w+", text)
    slug = ""
    for word in words:
        if len(slug) + len(word) + 1 > 60:
            break
        slug = f"{slug}-{word}" if slug else word
    return f"{slug or 'muse'}-{seed}.png"


def file_size(count: int) -> str:
    """As a picture over --max-upload is refused (muse.pictures), so the hint and the error say the same."""
    return f"{count / (1 << 20):g} MiB" if count >= 1 << 20 else f"{count:,} bytes"


def adapters(uses: Sequence[LoraUse]) -> str:
    """`ink 0.8, glow 1`: a request's LoRAs as its card and its gallery page list them."""
    return ", ".join(f"{use.name} {use.scale:g}" for use in uses)


def content_disposition(filename: str) -> str:
    # Old clients read `filename` (ASCII only); current ones prefer the UTF-8 `filename*`.
    ascii_name = re.sub(r"[^A-Za-z0-9._-]+", "-", filename).strip("-") or "image.png"
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename)}"


templates = Jinja2Templates(directory=TEMPLATES_DIR)
templates.env.filters.update(
    duration=duration, eta=eta, timestamp=timestamp, iso_time=iso_time, file_size=file_size, adapters=adapters
)
templates.env.globals.update(
    htmx_version=HTMX_VERSION,
    htmx_cdn=HTMX_CDN,
    htmx_integrity=HTMX_INTEGRITY,
    sse_cdn=SSE_CDN,
    sse_integrity=SSE_INTEGRITY,
)


def gallery_of(request: Request) -> Gallery | None:
    return getattr(request.app.state, "gallery", None)


def is_fragment(request: Request) -> bool:
    """An HTMX request wants the fragment, except a history restore, which needs the whole page."""
    return request.headers.get("HX-Request") == "true" and "HX-History-Restore-Request" not in request.headers


def base_context(request: Request) -> dict[str, Any]:
    """What every template may use."""
    return {
        "request": request,
        # The CSRF middleware sets it for every request; pages put it in hx-headers and hidden fields.
        "csrf_token": getattr(request.state, "csrf_token", ""),
        "gallery_enabled": gallery_of(request) is not None,
        "signed_in": getattr(request.state, "authenticated_by", None) == "cookie",
        "model": service(request).model,
    }


def render_text(request: Request, name: str, context: dict[str, Any]) -> str:
    """A template as text (an event of a stream, not a response)."""
    return templates.get_template(name).render(base_context(request) | context)


def render(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> Response:
    response = templates.TemplateResponse(request, name, base_context(request) | context, status_code=status_code)
    # The same URL answers with a page or a fragment: caches and the back button must keep them apart.
    response.headers["Vary"] = "HX-Request"
    return response


@dataclass(frozen=True)
class PictureView:
    """The picture the form starts from when it names one (not an upload), as its thumbnail shows it."""

    url: str
    width: int
    height: int
    caption: str
    mask_url: str | None = None  # the mask its job inpainted with, if any


def picked_picture(request: Request, form: FormValues) -> PictureView:
    """The picture `form` names, if this viewer may see it; InvalidRequest naming the picture field if not."""
    viewer = viewer_of(request)
    if form.init_id:
        gallery = gallery_of(request)
        image = None if gallery is None else gallery.get(form.init_id, viewer.owner_filter)
        if image is None:
            raise InvalidRequest("init_image: no such image in the gallery (deleted?)", param="init_image")
        return PictureView(f"/gallery/{image.id}.png", image.width, image.height, "From the gallery")
    try:
        ticket = service(request).job(form.init_job, viewer)
    except NotFound:
        ticket = None
    if ticket is None or ticket.request.source is None:
        raise InvalidRequest(
            "init_image: the job this picture came from is gone (finished more than the job TTL ago): "
            "choose the picture again",
            param="init_image",
        )
    request_, source = ticket.request, ticket.request.source
    mask_url = f"/jobs/{ticket.id}/mask.png" if source.mask is not None else None
    caption = "The picture it started from" + (", and its mask" if mask_url else "")
    return PictureView(f"/jobs/{ticket.id}/picture.png", request_.width, request_.height, caption, mask_url)


def studio_context(request: Request, form: FormValues) -> dict[str, Any]:
    gallery = gallery_of(request)
    model = service(request).model
    context: dict[str, Any] = {"picture": None}
    if form.picked and model.image_inputs:
        try:
            context["picture"] = picked_picture(request, form)
        except MuseError as error:
            # The rest of the form still stands: shown without the picture, and the card says why.
            form = form.without_picture()
            context["problem"] = problem(error)
    return context | {
        "form": form,
        "sizes": size_options(model),
        "samplers": sampler_options(model),
        "recent": [] if gallery is None else gallery.page(limit=RECENT, owner=viewer_of(request).owner_filter).images,
        "jobs": [],
        "max_upload": model.cost_limits.max_upload,
    }


def problem_response(
    request: Request, error: MuseError, form: FormValues | None = None, *, retry: bool = True
) -> Response:
    """The error as a card: alone for HTMX; in the studio (form refilled) or on its own page otherwise.
    `retry`: whether the card may offer to send `form` again (not when a file came with it: a form of hidden
    fields cannot carry one)."""
    shown = problem(error)
    context: dict[str, Any] = {"problem": shown, "retry_form": form if shown.retryable and retry else None}
    if is_fragment(request):
        return render(request, "_problem.html", context, shown.status)
    if form is not None:
        return render(request, "studio.html", studio_context(request, form) | context, shown.status)
    return render(request, "problem.html", context, shown.status)


def friendly(handler: Handler) -> Handler:
    """Errors become a card, never the JSON error body or a blank page."""

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except MuseError as error:
            return problem_response(request, error)
        except ClientDisconnect:
            raise  # nobody to show a card to
        except Exception as exc:
            log.exception("page %s %s failed", request.method, request.url.path, exc_info=exc)
            return problem_response(request, MuseError("an unexpected error happened; the server log has the details"))

    return wrapped
