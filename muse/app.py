"""`create_app(settings)`: routes, error handlers and the lifespan that starts and drains the service."""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from muse.api import a1111, a1111_state, native, openai, openapi
from muse.config import Settings
from muse.core.destinations import Allowlist
from muse.core.durable import DurableJobs
from muse.core.jobstore import JobStore
from muse.core.ratelimit import RateLimiter
from muse.core.service import Muse
from muse.core.webhooks import Webhooks
from muse.core.webhooks import load_secret as load_webhook_secret
from muse.errors import MethodNotAllowed, MuseError, NotFound
from muse.http.auth import ApiKeyAuth, KeyRing, load_keys
from muse.http.common import error_response
from muse.http.csrf import CsrfCheck
from muse.http.middleware import BodyLimit, SecurityHeaders, body_limit
from muse.http.sessions import Sessions
from muse.links import LinkSigner, load_secret
from muse.pools.factory import build_pool, devices_of, worker_range
from muse.slack.bot import start_slack
from muse.storage import Gallery
from muse.web import login, pages, stream
from muse.web.assets import PAGE_CSP, STATIC_DIR
from muse.web.login import LOGIN_ATTEMPTS_PER_MINUTE

log = logging.getLogger("muse.app")


async def muse_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, MuseError)
    return error_response(exc)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405 (no such route or method), in the one error shape."""
    assert isinstance(exc, HTTPException)
    error = MethodNotAllowed(str(exc.detail)) if exc.status_code == 405 else NotFound(str(exc.detail))
    return error_response(error, exc.headers)


async def client_gone(request: Request, exc: Exception) -> Response:
    """The client hung up (or was cut off for sending too slowly) while its body was read: nobody to answer."""
    return Response(status_code=400)


async def server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(MuseError("internal server error"))


def durable_jobs(
    settings: Settings, store: JobStore, gallery: Gallery, links: LinkSigner
) -> tuple[DurableJobs, Webhooks]:
    """Jobs on disk and their webhooks, both in the data dir beside the gallery their images live in."""
    data_dir = Path(settings.data_dir)
    secret = settings.webhook_secret or load_webhook_secret(data_dir)
    webhooks = Webhooks(
        store,
        secret=secret,
        allow=Allowlist.parse(settings.webhook_allow_hosts),
        links=links,
        public_url=settings.public_url,
        retry_for=settings.webhook_retry_for,
        first_retry=settings.webhook_first_retry,
        job_ttl=settings.job_ttl,
    )
    return DurableJobs(store, gallery, settings.job_ttl), webhooks


def create_app(settings: Settings, muse: Muse | None = None) -> Starlette:
    # The job store is checked first: a start refused for a file that is not ours has written nothing yet.
    store = None if settings.no_gallery or muse is not None else JobStore(Path(settings.data_dir))
    gallery = None if settings.no_gallery else Gallery(Path(settings.data_dir))
    # Links only ever point into the gallery; without one, nothing is written to the data folder.
    secret = load_secret(Path(settings.data_dir)) if gallery is not None else secrets.token_bytes(32)
    links = LinkSigner(secret, settings.link_ttl)
    durable, webhooks = (
        durable_jobs(settings, store, gallery, links) if store is not None and gallery is not None else (None, None)
    )
    service = muse or Muse(
        settings,
        build_pool(settings),
        workers=worker_range(settings, len(devices_of(settings))),
        gallery=gallery,
        durable=durable,
        webhooks=webhooks,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await service.start()
        bot = await start_slack(service, settings)
        try:
            yield
        finally:
            # Drain first: nothing new is accepted (from Slack either) while accepted work finishes.
            await service.drain()
            if bot is not None:
                await bot.stop()
            await service.stop()
            if gallery is not None:
                gallery.close()
            if durable is not None:
                durable.store.close()

    keys = KeyRing(load_keys(settings.api_keys), load_keys(settings.admin_keys))
    sessions = Sessions(settings.session_ttl)
    routes = [
        *native.routes,
        *openai.routes,
        *a1111.routes,
        *a1111_state.routes,
        *login.routes,
        Route("/openapi.json", openapi.endpoint),
        *pages.routes,
        *stream.routes,
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    # Outermost first: size limit before anything reads the body, headers on every response.
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    middleware = [
        # Other Host headers (a DNS-rebinding page) get 400 before anything else runs.
        Middleware(TrustedHostMiddleware, allowed_hosts=settings.host_names(), www_redirect=False),
        Middleware(SecurityHeaders, page_csp=PAGE_CSP),
        Middleware(BodyLimit, limit=body_limit(settings.max_upload)),
    ]
    if origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"]))
    # Keys first: the CSRF check needs to know whether a request was authenticated by cookie.
    middleware.append(Middleware(ApiKeyAuth, keys=keys, sessions=sessions, public_metrics=settings.public_metrics))
    public = settings.public_origin()
    middleware.append(Middleware(CsrfCheck, allowed_origins=[*origins, *([public] if public else [])]))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            MuseError: muse_error,
            HTTPException: http_error,
            ClientDisconnect: client_gone,
            Exception: server_error,
        },
    )
    app.state.keys = keys
    app.state.sessions = sessions
    app.state.login_attempts = RateLimiter(LOGIN_ATTEMPTS_PER_MINUTE)
    app.state.links = links
    app.state.muse = service
    app.state.gallery = gallery
    app.state.settings = settings
    return app
