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
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from saal.extras import import_extra

import_extra("fastapi", "app", "saal label")
import_extra("jinja2", "app", "saal label")

from fastapi import FastAPI, Form, Query, Request  # noqa: E402
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
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

from saal.app import db, exchange, labels  # noqa: E402
from saal.app.claims import claim_next  # noqa: E402
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


def create_app(project: Project, *, token: str | None = None, loopback: bool = True) -> FastAPI:
    """Return the application for ``project``.

    Args:
        token: the access token every request must carry (None: none needed, loopback only).
        loopback: the server listens on a loopback address (then only loopback ``Host`` headers are served).

    Returns:
        The FastAPI application.
    """
    app = FastAPI(title="saal label", docs_url=None, redoc_url=None, openapi_url=None)
    signer = Signer((project.state_dir / "secret").read_text().strip())
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["when"] = _when
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    engine, classes = project.engine, project.classes
    claim_seconds = float(project.settings.claim_seconds)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
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
            if fetch_site == "cross-site" or not same_origin(
                request.headers.get("origin"), request.headers.get("host")
            ):
                return PlainTextResponse("requests from other sites are refused", 403)
        response: Response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        return response

    def error_response(request: Request, status: int, message: str, item: int | None = None) -> Response:
        if "text/html" in request.headers.get("accept", "") and status != 503:
            return templates.TemplateResponse(
                request,
                "error.html",
                {"message": message, "status": status, "name": _name(request), "item_id": item},
                status_code=status,
            )
        return PlainTextResponse(message, status)

    @app.exception_handler(SaalError)
    async def saal_error(request: Request, error: SaalError) -> Response:
        status = 404 if isinstance(error, labels.NotFound) else 409 if isinstance(error, labels.Conflict) else 400
        status = 403 if isinstance(error, Refused) else 503 if isinstance(error, db.Busy) else status
        response = error_response(request, status, str(error), getattr(error, "item_id", None))
        if status == 503:  # one plain line: the database is busy, so nothing else is read
            response.headers["Retry-After"] = str(db.RETRY_AFTER)
        return response

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, error: RequestValidationError) -> Response:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "bad request"}
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "request"
        return error_response(request, 400, f"{where}: {first.get('msg', 'bad value')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        return error_response(request, error.status_code, str(error.detail))

    def _name(request: Request) -> str | None:
        return signer.annotator(request.cookies.get(SESSION_COOKIE))

    def require(request: Request, csrf: str | None) -> str:
        name = _name(request)
        if name is None:
            raise Refused("sign in first (open / and give your name)")
        if not signer.check_csrf(name, csrf):
            raise Refused("this form is stale or came from another site; reload the page")
        return name

    def common(request: Request, name: str | None) -> dict[str, Any]:
        return {"name": name, "csrf": signer.csrf(name) if name else "", "classes": classes, "project": project}

    @app.get("/", response_class=HTMLResponse)
    def label_page(request: Request) -> Response:
        name = _name(request)
        if name is None:
            return RedirectResponse("/login", 303)
        claimed = claim_next(engine, name, claim_seconds)
        status = snapshot(engine, classes)
        context = {
            **common(request, name),
            "item": claimed,
            "status": status,
            "request_id": uuid.uuid4().hex,
            "can_undo": _can_undo(name),
        }
        return templates.TemplateResponse(request, "label.html", context)

    def _can_undo(name: str) -> bool:
        with db.read(engine) as conn:
            return (
                conn.execute(select(db.events.c.id).where(db.events.c.annotator == name).limit(1)).first() is not None
            )

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request) -> Response:
        return templates.TemplateResponse(request, "login.html", {**common(request, _name(request))})

    @app.post("/login")
    def login(name: str = Form(...)) -> Response:
        checked = check_name(name)
        response = RedirectResponse("/", 303)
        response.set_cookie(
            SESSION_COOKIE, signer.session(checked), httponly=True, samesite="strict", max_age=30 * 86400
        )
        return response

    @app.post("/logout")
    def logout(request: Request, csrf: str = Form("")) -> Response:
        name = require(request, csrf)
        from saal.app.claims import release

        release(engine, name)
        response = RedirectResponse("/login", 303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    @app.post("/label")
    def label(
        request: Request,
        item_id: int = Form(..., ge=0, le=MAX_ID),
        label: str = Form(...),
        csrf: str = Form(""),
        request_id: str | None = Form(None),
        next: str = Form("/"),
        version: int | None = Form(None, ge=0, le=MAX_ID),  # the item's last_event as shown (409 if it changed)
    ) -> Response:
        name = require(request, csrf)
        labels.record_label(engine, item_id, label, classes, name, request_id or None, expected_event=version)
        return RedirectResponse(_safe_next(next), 303)

    @app.post("/skip")
    def skip(
        request: Request,
        item_id: int = Form(..., ge=0, le=MAX_ID),
        csrf: str = Form(""),
        request_id: str | None = Form(None),
        version: int | None = Form(None, ge=0, le=MAX_ID),
    ) -> Response:
        name = require(request, csrf)
        labels.record_skip(engine, item_id, name, request_id or None, expected_event=version)
        return RedirectResponse("/", 303)

    @app.post("/undo")
    def undo(request: Request, csrf: str = Form(""), request_id: str | None = Form(None)) -> Response:
        name = require(request, csrf)
        labels.undo_last(engine, name, claim_seconds, request_id or None)
        return RedirectResponse("/", 303)

    @app.post("/retrain")
    def retrain(request: Request, csrf: str = Form(""), next: str = Form("/")) -> Response:
        require(request, csrf)
        with db.write(engine) as conn:
            db.set_meta(conn, "retrain_requested", time.time())
        return RedirectResponse(_safe_next(next), 303)

    @app.get("/items/{item_id}", response_class=HTMLResponse)
    def item_page(request: Request, item_id: int = PathParam(..., ge=0, le=MAX_ID)) -> Response:
        row = labels.item(engine, item_id)
        events = labels.history(engine, item_id)
        context = {**common(request, _name(request)), "row": row, "events": events, "request_id": uuid.uuid4().hex}
        return templates.TemplateResponse(request, "item.html", context)

    @app.get("/labelled", response_class=HTMLResponse)
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
            **common(request, _name(request)),
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
        return templates.TemplateResponse(request, "labelled.html", context)

    @app.get("/unreadable", response_class=HTMLResponse)
    def unreadable_page(request: Request) -> Response:
        with db.read(engine) as conn:
            rows = conn.execute(
                select(db.items.c.id, db.items.c.path, db.items.c.error)
                .where(db.items.c.readable.is_(False))
                .order_by(db.items.c.path)
            ).all()
        prefix = f"{project.root}{os.sep}"  # reasons recorded before they were made relative
        listed = [(r.path, (r.error or "").replace(prefix, "")) for r in rows]
        context = {**common(request, _name(request)), "rows": listed}
        return templates.TemplateResponse(request, "unreadable.html", context)

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(FAVICON, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    @app.get("/image/{file:path}")
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

    @app.get("/export.csv")
    def export_csv() -> Response:
        return StreamingResponse(
            exchange.csv_chunks(engine),
            media_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="labels.csv"'},
        )

    @app.get("/export.json")
    def export_json() -> Response:
        return StreamingResponse(
            exchange.json_chunks(engine),
            media_type="application/json",
            headers={"Content-Disposition": 'attachment; filename="labels.json"'},
        )

    @app.get("/api/status")
    def api_status() -> Response:
        return JSONResponse(snapshot(engine, classes).as_json())

    @app.get("/api/next")
    def api_next(request: Request) -> Response:
        name = _name(request)
        if name is None:
            raise Refused("sign in first: POST /login with a name")
        claimed = claim_next(engine, name, claim_seconds)
        if claimed is None:
            return JSONResponse({"item": None, "csrf": signer.csrf(name)})
        item = {
            "id": claimed.id,
            "file": claimed.path,
            "predicted": claimed.predicted,
            "confidence": claimed.confidence,
            "picked_by": claimed.picked_by,
            "version": claimed.last_event or 0,
        }
        return JSONResponse({"item": item, "csrf": signer.csrf(name)})

    @app.post("/api/label")
    async def api_label(request: Request) -> Response:
        name = require(request, request.headers.get("x-csrf-token"))
        try:
            body = await request.json()
            item_id, label, request_id = int(body["item_id"]), str(body["label"]), body.get("request_id")
            version = None if body.get("version") is None else int(body["version"])
            if not 0 <= item_id <= MAX_ID or not isinstance(request_id, str | None):
                raise ValueError(item_id)
        except (ValueError, KeyError, TypeError, OverflowError):
            raise SaalError('give a JSON body {"item_id": N, "label": "class", "request_id": "..."}') from None
        from starlette.concurrency import run_in_threadpool

        record = partial(labels.record_label, expected_event=version)  # "version": as /api/next gave it (optional)
        recorded = await run_in_threadpool(record, engine, item_id, label, classes, name, request_id)
        return JSONResponse({"event_id": recorded.event_id, "repeated": recorded.repeated})

    return app
