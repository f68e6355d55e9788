"""HTMX pages: the studio (generate form + live job cards). The gallery lives in muse.web.gallery.

Every route answers a full page to a plain request and only its fragment to an HTMX one (contact-app
style). With JavaScript nothing polls: an unfinished job's card comes with a listener on its server-sent
events (muse.web.stream), which swap in the card when its state or queue position changes and its bar at
each step; a finished card comes without one. Without JavaScript the forms still work: POST, then a 303
to a page that refreshes itself every 2 s until the job ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from muse.core.service import Muse
from muse.core.tickets import Ticket, TicketState
from muse.errors import MuseError, NotFound, PayloadTooLarge, UnsupportedMediaType
from muse.http.auth import viewer_of
from muse.http.common import client_of
from muse.web import gallery as gallery_pages
from muse.web.forms import FormValues, problem
from muse.web.render import (
    content_disposition,
    download_name,
    friendly,
    is_fragment,
    problem_response,
    render,
    service,
    studio_context,
)

MAX_FORM_BYTES = 64 * 1024


@dataclass(frozen=True)
class ImageView:
    url: str
    download_url: str
    filename: str
    detail_url: str | None
    seed: int
    alt: str
    width: int
    height: int
    reuse: str  # query string that refills the form with this image's settings and seed


def job_view(muse: Muse, ticket: Ticket) -> dict[str, Any]:
    request = ticket.request
    images: list[ImageView] = []
    result = ticket.result
    if result is not None:
        saved = ticket.saved if len(ticket.saved) == len(result.images) else []
        base = FormValues.from_request(request, muse.model, keep_seed=False)
        for i, image in enumerate(result.images):
            # Gallery URLs outlive the job; without a gallery the job serves its own images until it expires.
            url = f"/gallery/{saved[i]}.png" if saved else f"/jobs/{ticket.id}/images/{i}.png"
            images.append(
                ImageView(
                    url=url,
                    download_url=f"{url}?download=1",
                    filename=download_name(request.prompt, image.seed),
                    detail_url=f"/gallery/{saved[i]}" if saved else None,
                    seed=image.seed,
                    alt=request.prompt,
                    width=result.width,
                    height=result.height,
                    reuse=base.reproducing(image.seed).query(),
                )
            )
    position = muse.position(ticket)
    return {
        "id": ticket.id,
        "state": ticket.state.value,
        "done": ticket.done,
        "position": position,
        "step": ticket.step,
        "steps": request.steps,
        "percent": round(100 * ticket.step / max(1, request.steps)),
        "eta": muse.eta(ticket),
        "request": request,
        "batch_size": ticket.batch_size,
        "result": result,
        "images": images,
        "problem": problem(ticket.error) if ticket.error is not None else None,
        "again": FormValues.from_request(request, muse.model, keep_seed=False),
    }


async def read_form(request: Request) -> FormValues:
    declared = request.headers.get("content-length", "0")
    if declared.isdigit() and int(declared) > MAX_FORM_BYTES:
        raise PayloadTooLarge("the form is too large")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise UnsupportedMediaType("send the form as application/x-www-form-urlencoded")
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise PayloadTooLarge("the form is too large")
    return FormValues.from_pairs(dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)))


# ---- routes ---------------------------------------------------------------------------------------


@friendly
async def studio(request: Request) -> Response:
    form = FormValues.from_pairs(dict(request.query_params))
    context = studio_context(request, form)
    # "Reuse seed" swaps in just the refilled form.
    return render(request, "_form.html" if is_fragment(request) else "studio.html", context)


@friendly
async def create_job(request: Request) -> Response:
    form = await read_form(request)
    muse = service(request)
    try:
        # Charged against --rate-limit like the JSON API (the identity comes from muse.http.auth).
        ticket = muse.submit(form.to_request(muse.model), keep=True, client=client_of(request))
    except MuseError as error:
        return problem_response(request, error, form)
    if not is_fragment(request):
        return RedirectResponse(f"/jobs/{ticket.id}", status_code=303)
    return render(request, "_job.html", {"job": job_view(muse, ticket)}, 201)


@friendly
async def show_job(request: Request) -> Response:
    muse = service(request)
    ticket = muse.job(request.path_params["id"], viewer_of(request))
    if is_fragment(request):
        return render(request, "_job.html", {"job": job_view(muse, ticket)})
    form = FormValues.from_request(ticket.request, muse.model, keep_seed=False)
    return render(request, "studio.html", studio_context(request, form) | {"jobs": [job_view(muse, ticket)]})


@friendly
async def cancel_job(request: Request) -> Response:
    muse = service(request)
    ticket = muse.cancel(request.path_params["id"], viewer=viewer_of(request))
    if not is_fragment(request):
        return RedirectResponse(f"/jobs/{ticket.id}", status_code=303)
    return render(request, "_job.html", {"job": job_view(muse, ticket)})


@friendly
async def job_image(request: Request) -> Response:
    """A finished job's image straight from memory, for when the gallery is off (or failed to store it)."""
    ticket = service(request).job(request.path_params["id"], viewer_of(request))
    digits: str = request.path_params["index"]
    # Checked here, not by a route convertor: int() of thousands of digits raises inside the router (a 500).
    index = int(digits) if digits.isascii() and digits.isdigit() and len(digits) <= 3 else -1
    if ticket.state is not TicketState.SUCCEEDED or ticket.result is None or not 0 <= index < len(ticket.result.images):
        raise NotFound("no such image in this job", param="index")
    image = ticket.result.images[index]
    headers = {"Cache-Control": "private, max-age=3600"}
    if "download" in request.query_params:
        headers["Content-Disposition"] = content_disposition(download_name(ticket.request.prompt, image.seed))
    return Response(image.png, media_type="image/png", headers=headers)


routes: list[BaseRoute] = [
    Route("/", studio, methods=["GET"], name="studio"),
    Route("/jobs", create_job, methods=["POST"], name="create_job"),
    Route("/jobs/{id}", show_job, methods=["GET"], name="job"),
    Route("/jobs/{id}/cancel", cancel_job, methods=["POST"], name="cancel_job"),
    Route("/jobs/{id}/images/{index}.png", job_image, methods=["GET"], name="job_image"),
    *gallery_pages.routes,
]
