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

import anyio
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from muse.core.service import Muse
from muse.core.tickets import Ticket, TicketState
from muse.errors import InvalidRequest, MuseError, NotFound, PayloadTooLarge, UnsupportedMediaType
from muse.http.auth import viewer_of
from muse.http.common import client_of
from muse.web import gallery as gallery_pages
from muse.web.forms import CLEARED, FormValues, problem
from muse.web.render import (
    content_disposition,
    download_name,
    friendly,
    gallery_of,
    is_fragment,
    picked_picture,
    problem_response,
    render,
    service,
    studio_context,
)

MAX_FORM_BYTES = 64 * 1024  # the form's text fields, all together (a picture comes on top, as a file)
MAX_FORM_FIELDS = 40
PICTURE_FIELD = "init_image"
MASK_FIELD = "mask_image"  # painted on the page (muse.js puts the painting in this file input), or a file
FILE_FIELDS = (PICTURE_FIELD, MASK_FIELD)
FORM_TYPE = "application/x-www-form-urlencoded"
MULTIPART_TYPE = "multipart/form-data"


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
    start_from: str | None  # query string of a form that starts from this image (it is in the gallery)


def job_view(muse: Muse, ticket: Ticket) -> dict[str, Any]:
    request = ticket.request
    images: list[ImageView] = []
    result = ticket.result
    # Made from a picture: the forms that ask again carry the job's id, which stands for its picture.
    again = FormValues.from_request(request, muse.model, keep_seed=False, job=ticket.id)
    if result is not None:
        saved = ticket.saved if len(ticket.saved) == len(result.images) else []
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
                    reuse=again.reproducing(image.seed).query(),
                    start_from=(
                        FormValues.starting_from(
                            saved[i], request.prompt, request.negative_prompt, request.loras
                        ).query()
                        if saved and muse.model.image_inputs
                        else None
                    ),
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
        "again": again,
        "source": request.source,
    }


@dataclass(frozen=True)
class Posted:
    """The generate form as posted: its fields, and the picture (and mask) uploaded with it."""

    form: FormValues
    # At most --max-upload + 1 bytes: a larger file is cut there, which is enough for it to be refused by name.
    picture: bytes | None = None
    refusal: InvalidRequest | None = None  # the upload was unusable; shown beside the refilled form
    mask: bytes | None = None  # white: repaint

    @property
    def uploaded(self) -> bool:
        """Whether a file came (a form of hidden fields cannot send it again)."""
        return self.picture is not None or self.mask is not None


async def read_form(request: Request, max_upload: int) -> Posted:
    """The form, sent urlencoded (no file) or as multipart (the page's with JavaScript on, or with a picture)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == MULTIPART_TYPE:
        return await read_multipart(request, max_upload)
    declared = request.headers.get("content-length", "0")
    if declared.isdigit() and int(declared) > MAX_FORM_BYTES:
        raise PayloadTooLarge("the form is too large")
    if kind != FORM_TYPE:
        raise UnsupportedMediaType(f"send the form as {FORM_TYPE} or {MULTIPART_TYPE}")
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise PayloadTooLarge("the form is too large")
    pairs = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    refusal = None
    for field in FILE_FIELDS:
        if pairs.get(field):
            # A browser sends a file input's name alone in a urlencoded form (a page from before the server
            # took pictures, or a hand-made form): refused by name rather than generating from text.
            refusal = InvalidRequest(
                f"{field}: only the file's name came, not the picture; send the form as {MULTIPART_TYPE} "
                "(reload the page)",
                param=field,
            )
    return Posted(FormValues.from_pairs(pairs), refusal=refusal)


async def read_multipart(request: Request, max_upload: int) -> Posted:
    # BodyLimit bounds the whole body (room for a picture over --max-upload, so that it is refused by name).
    try:
        data = await request.form(max_files=len(FILE_FIELDS), max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FORM_BYTES)
    except HTTPException as exc:  # Starlette's answer to a form it cannot parse
        raise InvalidRequest(f"the form cannot be read: {exc.detail}", code="invalid_multipart", status=400) from None
    try:
        pairs: dict[str, str] = {}
        files: dict[str, bytes] = {}
        refusal = None
        for name, value in data.multi_items():
            if isinstance(value, UploadFile):
                # An empty file input is still a part: one without a file name or bytes.
                if name in FILE_FIELDS and (value.filename or value.size):
                    if name in files:
                        refusal = InvalidRequest(f"{name}: send one picture, not several", param=name)
                    files[name] = await value.read(max_upload + 1)
            elif name in FILE_FIELDS and value:
                refusal = InvalidRequest(f"{name}: send the picture as a file, not as text", param=name)
            else:
                pairs[name] = value
    finally:
        await data.close()  # its files: spooled to disk past a megabyte
    return Posted(FormValues.from_pairs(pairs), files.get(PICTURE_FIELD), refusal, files.get(MASK_FIELD))


async def stored_picture(request: Request, form: FormValues) -> tuple[bytes, bytes | None] | None:
    """The picture (and mask) the form names instead of uploading one; None when it names none. Only what
    the requester may see: another key's gallery image or job is "no such" picture."""
    if not form.picked:
        return None
    picked_picture(request, form)  # refuses, by the picture's name, what this viewer may not see
    if form.init_id:
        gallery = gallery_of(request)
        path = None if gallery is None else gallery.png_path(form.init_id)
        gone = InvalidRequest(f"{PICTURE_FIELD}: no such image in the gallery (deleted?)", param=PICTURE_FIELD)
        if path is None:
            raise gone
        try:
            return await anyio.Path(path).read_bytes(), None
        except OSError:
            raise gone from None  # deleted since it was looked up
    source = service(request).job(form.init_job, viewer_of(request)).request.source
    assert source is not None, "picked_picture refuses a job without a picture"
    return source.image, source.mask


# ---- routes ---------------------------------------------------------------------------------------


@friendly
async def studio(request: Request) -> Response:
    form = FormValues.from_pairs(dict(request.query_params))
    context = studio_context(request, form)
    # "Reuse seed" swaps in just the refilled form.
    return render(request, "_form.html" if is_fragment(request) else "studio.html", context)


@friendly
async def create_job(request: Request) -> Response:
    muse = service(request)
    posted = await read_form(request, muse.model.cost_limits.max_upload)
    form = posted.form
    try:
        if posted.refusal is not None:
            raise posted.refusal
        # An upload wins over a picture the form names (the person chose a file after picking one), and a
        # mask painted or chosen now over the one a named picture came with.
        stored = None if posted.picture is not None else await stored_picture(request, form)
        image, mask = (posted.picture, posted.mask) if stored is None else stored
        if stored is not None and (posted.mask is not None or form.stored_mask == CLEARED):
            mask = posted.mask  # the page's Clear mask drops the one the picture came with
        if image is None and mask is not None:
            raise InvalidRequest(
                f"{MASK_FIELD}: a mask needs a picture to start from: choose one under Start from a picture",
                param=MASK_FIELD,
            )
        if image is None:
            generate = form.to_request(muse.model)
        else:
            # Decoding and fitting a large picture takes tens of milliseconds: off the event loop.
            generate = await anyio.to_thread.run_sync(form.to_request, muse.model, image, mask)
        # Charged against --rate-limit like the JSON API (the identity comes from muse.http.auth).
        ticket = muse.submit(generate, keep=True, client=client_of(request))
    except MuseError as error:
        return problem_response(request, error, form, retry=not posted.uploaded)
    if not is_fragment(request):
        return RedirectResponse(f"/jobs/{ticket.id}", status_code=303)
    return render(request, "_job.html", {"job": job_view(muse, ticket)}, 201)


@friendly
async def show_job(request: Request) -> Response:
    muse = service(request)
    ticket = muse.job(request.path_params["id"], viewer_of(request))
    if is_fragment(request):
        return render(request, "_job.html", {"job": job_view(muse, ticket)})
    form = FormValues.from_request(ticket.request, muse.model, keep_seed=False, job=ticket.id)
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


@friendly
async def job_picture(request: Request) -> Response:
    """The picture a job started from, as its worker got it (fitted to the job's size): the form's thumbnail
    when it starts from that picture again."""
    source = service(request).job(request.path_params["id"], viewer_of(request)).request.source
    if source is None:
        raise NotFound("this job started from text, not a picture", param="id")
    return Response(source.image, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@friendly
async def job_mask(request: Request) -> Response:
    """The mask a job inpainted with, fitted as its picture: shown as paint on the form that starts again from
    that picture, where it can be painted on or cleared."""
    source = service(request).job(request.path_params["id"], viewer_of(request)).request.source
    if source is None or source.mask is None:
        raise NotFound("this job had no mask", param="id")
    return Response(source.mask, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


routes: list[BaseRoute] = [
    Route("/", studio, methods=["GET"], name="studio"),
    Route("/jobs", create_job, methods=["POST"], name="create_job"),
    Route("/jobs/{id}", show_job, methods=["GET"], name="job"),
    Route("/jobs/{id}/cancel", cancel_job, methods=["POST"], name="cancel_job"),
    Route("/jobs/{id}/images/{index}.png", job_image, methods=["GET"], name="job_image"),
    Route("/jobs/{id}/picture.png", job_picture, methods=["GET"], name="job_picture"),
    Route("/jobs/{id}/mask.png", job_mask, methods=["GET"], name="job_mask"),
    *gallery_pages.routes,
]
