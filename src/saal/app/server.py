"""The web application: pages rendered on the server (Jinja2), a little plain JavaScript for the keys.

Pages: ``/`` (label the image SAAL ranks highest among those nobody holds), ``/login``, ``/labelled`` (filter
and fix labels), ``/items/{id}`` (an image's history, relabel), ``/unreadable``. Data: ``/image/{file}`` (files
inside the project folder only), ``/export.csv`` and ``/export.json`` (streamed), ``/api/status``, ``/api/next``
and ``/api/label`` (for scripts). Every change is a POST with a CSRF token (see :mod:`saal.app.security`).
Errors are one line with their status code: 400 bad input, 401 no token, 403 refused, 404 unknown, 409 conflict
(a form sent again with another answer, or about an image someone changed since it was shown: the page says who
did what and links to the image's history), 503 with ``Retry-After`` when the database stays locked for a few
seconds (another program writing to it).
Numbers in requests are bounded (an item id fits the database's integer, a page of ``/labelled`` is at most
:data:`MAX_PAGE`), and tokens, cookies and CSRF fields with any characters are compared as bytes: bad input is a 4xx
with a reason, never a 500. ``/favicon.ico`` is the page icon (an SVG).
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from saal.extras import import_extra

import_extra("fastapi", "app", "saal label")
import_extra("jinja2", "app", "saal label")

from fastapi import APIRouter, FastAPI, Form, Query, Request  # noqa: E402
from fastapi import Path as PathParam  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import (  # noqa: E402
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles  # noqa: E402
from fastapi.templating import Jinja2Templates  # noqa: E402
from sqlalchemy import select  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

from saal.app import db, exchange, labels  # noqa: E402
from saal.app.claims import claim_next, release  # noqa: E402
from saal.app.project import Project  # noqa: E402
from saal.app.security import (  # noqa: E402
    SESSION_COOKIE,
    TOKEN_COOKIE,
    Signer,
    check_name,
    host_allowed,
    same_origin,
    same_secret,
)
from saal.app.status import snapshot  # noqa: E402
from saal.errors import SaalError  # noqa: E402

HERE = Path(__file__).parent
PAGE_SIZE = 48
MAX_ID = 2**63 - 1  # the largest integer SQLite and PostgreSQL's BIGINT hold
MAX_PAGE = 10**9
FAVICON = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="6" fill="#1d2230"/>'
    '<path d="M8 17l5 5 11-12" fill="none" stroke="#9fb6ff" stroke-width="4" stroke-linecap="round" '
    'stroke-linejoin="round"/></svg>'
)


class Refused(SaalError):
    """A request without a valid session or CSRF token, or from another site (HTTP 403)."""


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    ago = max(0, int(time.time() - seconds))
    stamp = datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{stamp} ({ago} s ago)" if ago < 120 else f"{stamp} ({ago // 60} min ago)"


def _safe_next(target: str | None) -> str:
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


@dataclass
class Site:
    """What every route of one application shares: the project, its database, the signer and the templates."""

    project: Project
    signer: Signer
    templates: Jinja2Templates
    engine: Any = field(init=False)
    classes: list[str] = field(init=False)
    claim_seconds: float = field(init=False)

    def __post_init__(self) -> None:
        self.engine, self.classes = self.project.engine, self.project.classes
        self.claim_seconds = float(self.project.settings.claim_seconds)

    def name(self, request: Request) -> str | None:
        """Return the signed-in annotator's name (None: nobody signed in)."""
        return self.signer.annotator(request.cookies.get(SESSION_COOKIE))

    def require(self, request: Request, csrf: str | None) -> str:
        """Return the signed-in name of a state-changing request; raises :class:`Refused` without a session or a
        valid CSRF token."""
        name = self.name(request)
        if name is None:
            raise Refused("sign in first (open / and give your name)")
        if not self.signer.check_csrf(name, csrf):
            raise Refused("this form is stale or came from another site; reload the page")
        return name

    def page(self, request: Request, template: str, context: dict[str, Any], name: str | None = None) -> Response:
        """Return ``template`` rendered with ``context`` and what every page shows (the name, CSRF, classes)."""
        name = self.name(request) if name is None else name
        common = {"name": name, "csrf": self.signer.csrf(name) if name else "", "classes": self.classes}
        return self.templates.TemplateResponse(request, template, {**common, "project": self.project, **context})

    def error(self, request: Request, status: int, message: str, item: int | None = None) -> Response:
        """Return an error: a page for a browser (but 503: one line, nothing else is read), else one plain line."""
        if "text/html" in request.headers.get("accept", "") and status != 503:
            context = {"message": message, "status": status, "name": self.name(request), "item_id": item}
            return self.templates.TemplateResponse(request, "error.html", context, status_code=status)
        return PlainTextResponse(message, status)


def create_app(project: Project, *, token: str | None = None, loopback: bool = True) -> FastAPI:
    """Return the application for ``project``.

    Args:
        token: the access token every request must carry (None: none needed, loopback only).
        loopback: the server listens on a loopback address (then only loopback ``Host`` headers are served).

    Returns:
        The FastAPI application.
    """
    app = FastAPI(title="saal label", docs_url=None, redoc_url=None, openapi_url=None)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["when"] = _when
    site = Site(project, Signer((project.state_dir / "secret").read_text().strip()), templates)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.middleware("http")(partial(_guard, token=token, loopback=loopback))
    _add_error_handlers(app, site)
    for router in (_labelling_routes(site), _page_routes(site), _data_routes(site), _api_routes(site)):
        app.include_router(router)
    return app


async def _guard(request: Request, call_next: Any, *, token: str | None, loopback: bool) -> Response:
    """Refuse foreign hosts, requests without the token and cross-site changes; add the security headers."""
    if loopback and not host_allowed(request.headers.get("host")):
        return PlainTextResponse("this server answers only to localhost / 127.0.0.1 addresses", 400)
    if token is not None:
        given = request.query_params.get("token")
        auth = request.headers.get("authorization", "")
        offered = given or (auth[7:] if auth.lower().startswith("bearer ") else None)
        offered = offered or request.cookies.get(TOKEN_COOKIE)
        if not same_secret(offered, token):
            return PlainTextResponse(
                "this server needs its access token: open the address saal label printed (it ends in ?token=...)",
                401,
            )
        if given and request.method == "GET":
            query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
            back = RedirectResponse(request.url.path + (f"?{query}" if query else ""), 303)
            back.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return back
    if request.method not in ("GET", "HEAD"):
        fetch_site = request.headers.get("sec-fetch-site")
        if fetch_site == "cross-site" or not same_origin(request.headers.get("origin"), request.headers.get("host")):
            return PlainTextResponse("requests from other sites are refused", 403)
    response: Response = await call_next(request)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    return response


def _add_error_handlers(app: FastAPI, site: Site) -> None:
    @app.exception_handler(SaalError)
    async def saal_error(request: Request, error: SaalError) -> Response:
        status = 404 if isinstance(error, labels.NotFound) else 409 if isinstance(error, labels.Conflict) else 400
        status = 403 if isinstance(error, Refused) else 503 if isinstance(error, db.Busy) else status
        response = site.error(request, status, str(error), getattr(error, "item_id", None))
        if status == 503:  # one plain line: the database is busy, so nothing else is read
            response.headers["Retry-After"] = str(db.RETRY_AFTER)
        return response

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, error: RequestValidationError) -> Response:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "bad request"}
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "request"
        return site.error(request, 400, f"{where}: {first.get('msg', 'bad value')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        return site.error(request, error.status_code, str(error.detail))


def _labelling_routes(site: Site) -> APIRouter:
    """The label page and every change a person makes: sign in and out, label, skip, undo, ask for a retrain."""
    router = APIRouter()
    engine, classes = site.engine, site.classes

    @router.get("/", response_class=HTMLResponse)
    def label_page(request: Request) -> Response:
        name = site.name(request)
        if name is None:
            return RedirectResponse("/login", 303)
        claimed = claim_next(engine, name, site.claim_seconds)
        context = {"item": claimed, "status": snapshot(engine, classes), "request_id": uuid.uuid4().hex}
        return site.page(request, "label.html", {**context, "can_undo": _has_labelled(engine, name)}, name)

    @router.get("/login", response_class=HTMLResponse)
    def login_page(request: Request) -> Response:
        return site.page(request, "login.html", {})

    @router.post("/login")
    def login(name: str = Form(...)) -> Response:
        response = RedirectResponse("/", 303)
        session = site.signer.session(check_name(name))
        response.set_cookie(SESSION_COOKIE, session, httponly=True, samesite="strict", max_age=30 * 86400)
        return response

    @router.post("/logout")
    def logout(request: Request, csrf: str = Form("")) -> Response:
        release(engine, site.require(request, csrf))
        response = RedirectResponse("/login", 303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    @router.post("/label")
    def label(
        request: Request,
        item_id: int = Form(..., ge=0, le=MAX_ID),
        label: str = Form(...),
        csrf: str = Form(""),
        request_id: str | None = Form(None),
        next: str = Form("/"),
        version: int | None = Form(None, ge=0, le=MAX_ID),  # the item's last_event as shown (409 if it changed)
    ) -> Response:
        name = site.require(request, csrf)
        labels.record_label(engine, item_id, label, classes, name, request_id or None, expected_event=version)
        return RedirectResponse(_safe_next(next), 303)

    @router.post("/skip")
    def skip(
        request: Request,
        item_id: int = Form(..., ge=0, le=MAX_ID),
        csrf: str = Form(""),
        request_id: str | None = Form(None),
        version: int | None = Form(None, ge=0, le=MAX_ID),
    ) -> Response:
        name = site.require(request, csrf)
        labels.record_skip(engine, item_id, name, request_id or None, expected_event=version)
        return RedirectResponse("/", 303)

    @router.post("/undo")
    def undo(request: Request, csrf: str = Form(""), request_id: str | None = Form(None)) -> Response:
        labels.undo_last(engine, site.require(request, csrf), site.claim_seconds, request_id or None)
        return RedirectResponse("/", 303)

    @router.post("/retrain")
    def retrain(request: Request, csrf: str = Form(""), next: str = Form("/")) -> Response:
        site.require(request, csrf)
        with db.write(engine) as conn:
            db.set_meta(conn, "retrain_requested", time.time())
        return RedirectResponse(_safe_next(next), 303)

    return router


def _has_labelled(engine: Any, name: str) -> bool:
    with db.read(engine) as conn:
        return conn.execute(select(db.events.c.id).where(db.events.c.annotator == name).limit(1)).first() is not None


def _page_routes(site: Site) -> APIRouter:
    """The pages that read: an image's history, the labelled images with filters, the unreadable files."""
    router = APIRouter()
    engine = site.engine

    @router.get("/items/{item_id}", response_class=HTMLResponse)
    def item_page(request: Request, item_id: int = PathParam(..., ge=0, le=MAX_ID)) -> Response:
        row, events = labels.item(engine, item_id), labels.history(engine, item_id)
        return site.page(request, "item.html", {"row": row, "events": events, "request_id": uuid.uuid4().hex})

    @router.get("/labelled", response_class=HTMLResponse)
    def labelled_page(
        request: Request, label: str = "", annotator: str = "", page: int = Query(1, le=MAX_PAGE)
    ) -> Response:
        page = max(1, page)
        rows, total = labels.labelled_page(
            engine, label=label or None, annotator=annotator or None, offset=(page - 1) * PAGE_SIZE, limit=PAGE_SIZE
        )
        with db.read(engine) as conn:
            people = sorted(
                str(a) for a in conn.execute(select(db.items.c.annotator).distinct()).scalars() if a is not None
            )
        context = {
            "rows": rows,
            "total": total,
            "page": page,
            "pages": max(1, -(-total // PAGE_SIZE)),
            "label": label,
            "annotator": annotator,
            "annotators": people,
            "request_id": uuid.uuid4().hex,
            "here": str(request.url.path) + (f"?{request.url.query}" if request.url.query else ""),
        }
        return site.page(request, "labelled.html", context)

    @router.get("/unreadable", response_class=HTMLResponse)
    def unreadable_page(request: Request) -> Response:
        with db.read(engine) as conn:
            rows = conn.execute(
                select(db.items.c.id, db.items.c.path, db.items.c.error)
                .where(db.items.c.readable.is_(False))
                .order_by(db.items.c.path)
            ).all()
        prefix = f"{site.project.root}{os.sep}"  # reasons recorded before they were made relative
        return site.page(
            request, "unreadable.html", {"rows": [(r.path, (r.error or "").replace(prefix, "")) for r in rows]}
        )

    return router


def _data_routes(site: Site) -> APIRouter:
    """Files: the page icon, the project's images (those it lists, inside its folder only), the exports."""
    router = APIRouter()
    engine, project = site.engine, site.project

    @router.get("/favicon.ico")
    def favicon() -> Response:
        return Response(FAVICON, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    @router.get("/image/{file:path}")
    def image(file: str) -> Response:
        try:
            path = project.resolve_image(file)
        except SaalError as error:
            raise labels.NotFound(str(error)) from None
        relative = path.relative_to(project.root.resolve()).as_posix()
        with db.read(engine) as conn:
            known = conn.execute(select(db.items.c.id).where(db.items.c.path == relative)).first()
        if known is None or not path.is_file():
            raise labels.NotFound(f"{file!r} is not an image of this project")
        return FileResponse(path, headers={"Cache-Control": "private, max-age=3600"})

    @router.get("/export.csv")
    def export_csv() -> Response:
        disposition = {"Content-Disposition": 'attachment; filename="labels.csv"'}
        return StreamingResponse(exchange.csv_chunks(engine), media_type="text/csv", headers=disposition)

    @router.get("/export.json")
    def export_json() -> Response:
        disposition = {"Content-Disposition": 'attachment; filename="labels.json"'}
        return StreamingResponse(exchange.json_chunks(engine), media_type="application/json", headers=disposition)

    return router


def _api_routes(site: Site) -> APIRouter:
    """The JSON API for scripts: status, the next image to label, a label."""
    router = APIRouter(prefix="/api")
    engine, classes = site.engine, site.classes

    @router.get("/status")
    def api_status() -> Response:
        return JSONResponse(snapshot(engine, classes).as_json())

    @router.get("/next")
    def api_next(request: Request) -> Response:
        name = site.name(request)
        if name is None:
            raise Refused("sign in first: POST /login with a name")
        claimed = claim_next(engine, name, site.claim_seconds)
        if claimed is None:
            return JSONResponse({"item": None, "csrf": site.signer.csrf(name)})
        item = {
            "id": claimed.id,
            "file": claimed.path,
            "predicted": claimed.predicted,
            "confidence": claimed.confidence,
            "picked_by": claimed.picked_by,
            "version": claimed.last_event or 0,
        }
        return JSONResponse({"item": item, "csrf": site.signer.csrf(name)})

    @router.post("/label")
    async def api_label(request: Request) -> Response:
        name = site.require(request, request.headers.get("x-csrf-token"))
        try:
            body = await request.json()
            item_id, label, request_id = int(body["item_id"]), str(body["label"]), body.get("request_id")
            version = None if body.get("version") is None else int(body["version"])
            if not 0 <= item_id <= MAX_ID or not isinstance(request_id, str | None):
                raise ValueError(item_id)
        except (ValueError, KeyError, TypeError, OverflowError):
            raise SaalError('give a JSON body {"item_id": N, "label": "class", "request_id": "..."}') from None
        record = partial(labels.record_label, expected_event=version)  # "version": as /api/next gave it (optional)
        recorded = await run_in_threadpool(record, engine, item_id, label, classes, name, request_id)
        return JSONResponse({"event_id": recorded.event_id, "repeated": recorded.repeated})

    return router
