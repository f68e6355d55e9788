"""Gallery pages: the newest-first grid with prompt search, one image's detail view, delete, and the PNG files."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from muse.errors import Forbidden, NotFound
from muse.http.auth import viewer_of
from muse.links import LinkSigner
from muse.schema import split_tags
from muse.storage import Gallery, GalleryImage
from muse.web.forms import FormValues, adapter_fields
from muse.web.render import content_disposition, download_name, friendly, gallery_of, is_fragment, render, service

PAGE_SIZE = 24


def require_gallery(request: Request) -> Gallery:
    gallery = gallery_of(request)
    if gallery is None:
        raise NotFound("the gallery is off on this server (--no-gallery)")
    return gallery


def require_image(request: Request) -> tuple[Gallery, GalleryImage]:
    gallery = require_gallery(request)
    image = gallery.get(request.path_params["id"], viewer_of(request).owner_filter)
    if image is None:
        raise NotFound("no such image in the gallery (deleted?)", param="id")
    return gallery, image


def reuse_query(request: Request, image: GalleryImage) -> str:
    """The form refilled with this image's settings and seed (n=1: reproduce this one image)."""
    model = service(request).model
    native = (image.width, image.height) == (model.width, model.height)
    return FormValues(
        **adapter_fields(image.prompt, split_tags(image.loras)[1]),
        negative_prompt=image.negative_prompt,
        steps=str(image.steps),
        seed=str(image.seed),
        size="" if native else f"{image.width}x{image.height}",
        guidance_scale=f"{image.guidance_scale:g}",
        scheduler=image.scheduler,
    ).query()


@friendly
async def gallery_page(request: Request) -> Response:
    gallery = gallery_of(request)
    query = request.query_params.get("q", "").strip()
    page = None
    if gallery is not None:
        after, before = request.query_params.get("after"), request.query_params.get("before")
        page = gallery.page(query, limit=PAGE_SIZE, after=after, before=before, owner=viewer_of(request).owner_filter)
    context = {"page": page, "q": query}
    return render(request, "_gallery_results.html" if is_fragment(request) else "gallery.html", context)


@friendly
async def image_page(request: Request) -> Response:
    _, image = require_image(request)
    context = {
        "image": image,
        "filename": download_name(image.prompt, image.seed),
        "loras": split_tags(image.loras)[1],  # stored as the A1111 tags its PNG carries
        "reuse": reuse_query(request, image),
        "start_from": (
            FormValues.starting_from(image.id, image.prompt, image.negative_prompt, split_tags(image.loras)[1]).query()
            if service(request).model.image_inputs
            else None
        ),
    }
    return render(request, "image.html", context)


@friendly
async def image_file(request: Request) -> Response:
    if "sig" in request.query_params:
        links: LinkSigner = request.app.state.links
        query = request.query_params
        if not links.valid(request.url.path, query.get("expires", ""), query["sig"]):
            raise Forbidden("this image link is not valid or has expired", param="sig", code="bad_link")
    gallery, image = require_image(request)
    path = gallery.png_path(image.id)
    if path is None:
        raise NotFound("the image's file is missing", param="id")
    # An id names one image forever: browsers may keep it.
    headers = {"Cache-Control": "private, max-age=31536000, immutable"}
    if "download" in request.query_params:
        headers["Content-Disposition"] = content_disposition(download_name(image.prompt, image.seed))
    return FileResponse(path, media_type="image/png", headers=headers)


@friendly
async def delete_image(request: Request) -> Response:
    gallery, image = require_image(request)
    gallery.delete(image.id, viewer_of(request).owner_filter)
    if is_fragment(request):
        # An HTMX delete from the detail page: send the browser back to the grid.
        return Response(status_code=204, headers={"HX-Redirect": "/gallery"})
    return RedirectResponse("/gallery", status_code=303)


# The .png route comes first: "/gallery/{id}" would otherwise match "abc.png" too.
routes: list[BaseRoute] = [
    Route("/gallery", gallery_page, methods=["GET"], name="gallery"),
    Route("/gallery/{id}.png", image_file, methods=["GET"], name="gallery_png"),
    Route("/gallery/{id}", image_page, methods=["GET"], name="gallery_image"),
    Route("/gallery/{id}/delete", delete_image, methods=["POST"], name="delete_image"),
]
