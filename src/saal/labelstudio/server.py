"""The ML backend's HTTP face: a FastAPI application serving Label Studio's ML-backend protocol.

Routes: ``GET /`` and ``GET /health`` (``{"status": "UP", "model_class": "saal"}``), ``GET /metrics``,
``GET /versions``, ``POST /setup``, ``POST /predict``, ``POST /webhook`` (answered 201, as Label Studio's own
backends do) and ``POST /train`` (the older protocol's training request: a retrain, as ``START_TRAINING``).

Every body must be a JSON object: anything else is a 400 with one line. A request saal cannot serve is a 4xx with
one line (``{"error": ...}``), never a traceback; an unexpected failure is a 500 with one line (its traceback goes
to the log). With ``basic_auth`` every request needs it (Label Studio sends it when the connection says so).
"""

from __future__ import annotations

import base64
import json
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

from saal.errors import SaalError
from saal.extras import import_extra

import_extra("fastapi", "labelstudio", "saal label-studio")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, Response  # noqa: E402

from saal.app.db import Busy  # noqa: E402
from saal.app.security import same_secret  # noqa: E402
from saal.labelstudio.backend import Backend, Refused  # noqa: E402
from saal.labelstudio.client import LabelStudioError  # noqa: E402

MAX_BODY = 64 * 1024 * 1024


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"status": "error", "error": " ".join(str(message).split())}, status_code=status)


async def _body(request: Request) -> dict[str, Any]:
    """Return the request's JSON object.

    Raises:
        Refused: a body that is too large, not JSON or not an object.
    """
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise Refused(f"the body is larger than {MAX_BODY >> 20} MiB", 413)
    if not raw.strip():
        raise Refused("the body is empty; send a JSON object")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise Refused(f"the body is not JSON ({str(error).splitlines()[0]}); send a JSON object") from None
    if not isinstance(data, dict):
        raise Refused(f"the body is JSON but not an object (a {type(data).__name__}); send a JSON object")
    return data


def _basic(header: str | None) -> tuple[str, str] | None:
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        user, _, password = base64.b64decode(header[6:].strip()).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return user, password


def create_app(
    backend: Backend, *, basic_auth: tuple[str, str] | None = None, log: Callable[[str], None] = print
) -> FastAPI:
    """Return the FastAPI application serving ``backend``."""
    app = FastAPI(title="saal label-studio", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if basic_auth is not None:
            given = _basic(request.headers.get("authorization"))
            if given is None or not (same_secret(given[0], basic_auth[0]) and same_secret(given[1], basic_auth[1])):
                return JSONResponse(
                    {"status": "error", "error": "this backend needs HTTP basic auth (the connection's user and pass)"},
                    status_code=401,
                    headers={"WWW-Authenticate": 'Basic realm="saal"'},
                )
        return await call_next(request)

    _routes(app, backend, log)
    return app


async def _answer(
    request: Request,
    function: Callable[[dict[str, Any]], dict[str, Any]],
    log: Callable[[str], None],
    *,
    status: int = 200,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    """Read the request's JSON object, run ``function`` on it in a worker thread (it writes to databases: the event
    loop keeps answering) and answer its result, or one line for any failure."""
    from starlette.concurrency import run_in_threadpool

    try:
        body = await _body(request)
        return JSONResponse(await run_in_threadpool(function, {**body, **(extra or {})}), status_code=status)
    except Refused as error:
        return _error(error.status, str(error))
    except LabelStudioError as error:
        return _error(502, str(error))
    except Busy as error:
        return _error(503, str(error))
    except SaalError as error:
        return _error(400, str(error))
    except Exception as error:  # a bug: one line to the client, the traceback to the log
        log(f"unexpected {type(error).__name__} on {request.method} {request.url.path}\n{traceback.format_exc()}")
        return _error(500, f"{type(error).__name__}: {error}")


def _routes(app: FastAPI, backend: Backend, log: Callable[[str], None]) -> None:
    @app.get("/")
    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "UP", "model_class": "saal", "projects": sorted(backend.mirrors)}

    @app.get("/metrics")
    def metrics() -> dict[str, Any]:
        return backend.metrics()

    @app.get("/versions")
    async def versions(request: Request) -> JSONResponse:
        project = request.query_params.get("project")
        if project is not None:
            try:
                return JSONResponse(backend.versions(project))
            except Refused as error:
                return _error(error.status, str(error))
        return await _answer(request, lambda body: backend.versions(body.get("project")), log)

    @app.post("/setup")
    async def setup(request: Request) -> JSONResponse:
        return await _answer(request, backend.setup, log)

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        return await _answer(request, backend.predict, log)

    @app.post("/webhook")
    async def webhook(request: Request) -> JSONResponse:
        return await _answer(request, backend.webhook, log, status=201)

    @app.post("/train")
    async def train(request: Request) -> JSONResponse:
        return await _answer(request, backend.webhook, log, status=201, extra={"action": "START_TRAINING"})
