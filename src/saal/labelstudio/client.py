"""Label Studio's REST API, over plain HTTP (httpx): what the backend reads and writes there.

Authentication: a legacy API token (``Authorization: Token KEY``, Account & Settings > Legacy Token) or a
personal access token (a JWT refresh token: exchanged at ``POST /api/token/refresh/`` for a short-lived access token,
sent as ``Authorization: Bearer ...`` and renewed on a 401). Every failure is one :class:`LabelStudioError` line
(unreachable, a refused token, an unexpected answer), never a traceback.

Images: a task's image URL is read from Label Studio with the token when it lies on Label Studio's host (uploads
``/data/upload/...``, local files ``/data/local-files/?d=...``, or an absolute URL on the same host), and without it
anywhere else (the token never leaves for another host).
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urljoin, urlsplit

from saal.errors import SaalError
from saal.extras import import_extra

import_extra("httpx", "labelstudio", "saal label-studio")

import httpx  # noqa: E402  (after the one-line "install saal[labelstudio]" check)

PAGE_SIZE = 100
MAX_IMAGE_BYTES = 64 * 1024 * 1024


class LabelStudioError(SaalError):
    """Label Studio could not be reached, refused the token or answered something unexpected.

    Attributes:
        status: the HTTP status (0: no answer).
    """

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def _jwt_type(token: str) -> str | None:
    """Return the ``token_type`` claim of a JWT (None: not a JWT, so a legacy token)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, json.JSONDecodeError):
        return None
    return str(claims.get("token_type")) if isinstance(claims, dict) else None


def _reason(response: Any) -> str:
    """Return the one-line reason of an error response (Label Studio's ``detail``, else the start of its body)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        detail = body.get("detail") or body.get("validation_errors") or body.get("error")
        if detail:
            return " ".join(str(detail).split())[:300]
    text = " ".join(response.text.split())
    return text[:200] or response.reason_phrase


class LabelStudio:
    """A client of one Label Studio server.

    Args:
        url: Label Studio's address, e.g. ``http://localhost:8080``.
        token: a legacy API token or a personal access token.
        timeout: seconds per request.
    """

    def __init__(self, url: str, token: str, timeout: float = 30.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SaalError(f"--label-studio-url {url!r} is not an http(s) address, e.g. http://localhost:8080")
        if not token or not token.strip():
            raise SaalError("no Label Studio token; give --label-studio-token (Account & Settings in Label Studio)")
        self.url = url.rstrip("/")
        self._token = token.strip()
        self._refresh = _jwt_type(self._token) == "refresh"
        self._access: str | None = None
        self._lock = threading.Lock()
        self.http = httpx.Client(base_url=self.url, timeout=timeout, follow_redirects=False)

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    # -- authentication ------------------------------------------------------------------------------
    def _auth(self, renew: bool = False) -> dict[str, str]:
        if not self._refresh:
            return {"Authorization": f"Token {self._token}"}
        with self._lock:
            if self._access is None or renew:
                answer = self._send("POST", "/api/token/refresh/", {}, json={"refresh": self._token})
                if answer.status_code != 200:
                    raise LabelStudioError(
                        f"Label Studio at {self.url} refused the personal access token ({answer.status_code} "
                        f"{_reason(answer)}); create a new one in Account & Settings",
                        answer.status_code,
                    )
                self._access = str(answer.json().get("access"))
            return {"Authorization": f"Bearer {self._access}"}

    def _send(self, method: str, path: str, headers: dict[str, str], **kwargs: Any) -> Any:
        try:
            return self.http.request(method, path, headers=headers, **kwargs)
        except httpx.TimeoutException:
            raise LabelStudioError(f"Label Studio at {self.url} did not answer {method} {path} in time") from None
        except httpx.HTTPError as error:
            why = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise LabelStudioError(
                f"cannot reach Label Studio at {self.url} ({why}); start it, or give --label-studio-url"
            ) from None

    def request(self, method: str, path: str, *, ok: tuple[int, ...] = (200, 201, 204), **kwargs: Any) -> Any:
        """Send one API request and return its JSON answer (None for an empty one).

        Raises:
            LabelStudioError: no answer, a refused token (401/403) or another status than ``ok``.
        """
        answer = self._send(method, path, self._auth(), **kwargs)
        if answer.status_code == 401 and self._refresh:
            answer = self._send(method, path, self._auth(renew=True), **kwargs)
        if answer.status_code in (401, 403):
            raise LabelStudioError(
                f"Label Studio at {self.url} refused the token ({answer.status_code} {_reason(answer)}); give the "
                "access token of Account & Settings as --label-studio-token",
                answer.status_code,
            )
        if answer.status_code not in ok:
            raise LabelStudioError(
                f"Label Studio answered {method} {path} with {answer.status_code}: {_reason(answer)}",
                answer.status_code,
            )
        if not answer.content:
            return None
        try:
            return answer.json()
        except ValueError:
            raise LabelStudioError(f"Label Studio answered {method} {path} with something that is not JSON") from None

    # -- reading ---------------------------------------------------------------------------------------
    def check(self) -> str:
        """Check that Label Studio answers and accepts the token; return its version.

        Raises:
            LabelStudioError: unreachable, or the token is refused.
        """
        self.request("GET", "/api/current-user/whoami")
        try:
            version = self.request("GET", "/api/version")
        except LabelStudioError:
            return "unknown"
        return str(version.get("release", "unknown")) if isinstance(version, dict) else "unknown"

    def project(self, project_id: int) -> dict[str, Any]:
        """Return the project ``project_id`` (its ``label_config``, ``model_version``, ...)."""
        found: dict[str, Any] = self.request("GET", f"/api/projects/{int(project_id)}")
        return found

    def tasks(self, project_id: int, *, query: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Yield every task of the project (with its annotations), page by page, in the order of ``query``."""
        page = 1
        while True:
            params: dict[str, Any] = {"project": int(project_id), "page": page, "page_size": PAGE_SIZE}
            params["fields"] = "all"
            if query:
                params["query"] = json.dumps(query)
            try:
                found = self.request("GET", "/api/tasks", params=params)
            except LabelStudioError as error:
                if error.status == 404 and page > 1:  # past the last page
                    return
                raise
            rows = found.get("tasks", []) if isinstance(found, dict) else found
            yield from rows
            total = int(found.get("total", 0)) if isinstance(found, dict) else len(rows)
            if not rows or page * PAGE_SIZE >= total:
                return
            page += 1

    def task(self, task_id: int) -> dict[str, Any]:
        """Return the task ``task_id`` with its annotations."""
        found: dict[str, Any] = self.request("GET", f"/api/tasks/{int(task_id)}")
        return found

    def download(self, url: str) -> bytes:
        """Return the bytes at ``url`` (a task's image): with the token on Label Studio's host, without elsewhere.

        Raises:
            LabelStudioError: an address that cannot be read (the message says why).
        """
        parts = urlsplit(url)
        if parts.scheme and parts.scheme not in ("http", "https"):
            raise LabelStudioError(f"{url[:120]}: {parts.scheme}:// addresses are not read by saal (use http(s))")
        absolute = urljoin(self.url + "/", url)
        here = urlsplit(absolute).netloc == urlsplit(self.url).netloc
        headers = self._auth() if here else {}
        try:
            with httpx.stream("GET", absolute, headers=headers, timeout=60, follow_redirects=not here) as answer:
                if answer.status_code != 200:
                    raise LabelStudioError(f"{url[:120]}: HTTP {answer.status_code}", answer.status_code)
                data = bytearray()
                for chunk in answer.iter_bytes():
                    data.extend(chunk)
                    if len(data) > MAX_IMAGE_BYTES:
                        raise LabelStudioError(f"{url[:120]}: larger than {MAX_IMAGE_BYTES >> 20} MiB")
                return bytes(data)
        except httpx.HTTPError as error:
            raise LabelStudioError(f"{url[:120]}: {str(error).splitlines()[0] if str(error) else error}") from None

    # -- writing ---------------------------------------------------------------------------------------
    def import_predictions(self, project_id: int, predictions: list[dict[str, Any]]) -> int:
        """Add ``predictions`` (each with ``task``, ``result``, ``score``, ``model_version``); return how many."""
        if not predictions:
            return 0
        found = self.request("POST", f"/api/projects/{int(project_id)}/import/predictions", json=predictions)
        return int(found.get("created", len(predictions))) if isinstance(found, dict) else len(predictions)

    def set_model_version(self, project_id: int, model_version: str) -> None:
        """Make ``model_version`` the project's version: the one the Data Manager's prediction score reads."""
        self.request("PATCH", f"/api/projects/{int(project_id)}", json={"model_version": model_version})

    def prediction_ids(self, project_id: int, model_versions: set[str]) -> list[int]:
        """Return the ids of the project's predictions of ``model_versions``."""
        found = self.request("GET", "/api/predictions/", params={"project": int(project_id)})
        rows = found.get("results", found) if isinstance(found, dict) else found
        return [int(p["id"]) for p in rows or [] if p.get("model_version") in model_versions]

    def delete_prediction(self, prediction_id: int) -> None:
        """Delete one prediction (gone already: nothing to do)."""
        self.request("DELETE", f"/api/predictions/{int(prediction_id)}/", ok=(200, 204, 404))

    def predicted_tasks(self, project_id: int, model_version: str) -> set[int]:
        """Return the ids of the tasks that hold a prediction of ``model_version``."""
        found = self.request("GET", "/api/predictions/", params={"project": int(project_id)})
        rows = found.get("results", found) if isinstance(found, dict) else found
        return {int(p["task"]) for p in rows or [] if p.get("model_version") == model_version}

    def connect(self, project_id: int, url: str, basic_auth: tuple[str, str] | None = None) -> str:
        """Connect the ML backend at ``url`` to the project (Settings > Model); return what was done, in words.

        Label Studio then calls the backend's ``/health`` and ``/setup``, and makes ``url/webhook`` a webhook of the
        project: the backend must be serving already.

        Raises:
            LabelStudioError: Label Studio refused (the message says why; a local address refused by its SSRF
                protection names the setting that allows it).
        """
        found = self.request("GET", "/api/ml/", params={"project": int(project_id)})
        for backend in found if isinstance(found, list) else []:
            if str(backend.get("url", "")).rstrip("/") == url.rstrip("/"):
                return f"project {project_id} was connected to {url} already"
        body: dict[str, Any] = {"url": url, "project": int(project_id), "title": "saal", "is_interactive": False}
        if basic_auth is not None:
            body.update(auth_method="BASIC_AUTH", basic_auth_user=basic_auth[0], basic_auth_pass=basic_auth[1])
        try:
            self.request("POST", "/api/ml/", json=body)
        except LabelStudioError as error:
            hint = ""
            if error.status == 400 and ("local" in str(error).lower() or "ip" in str(error).lower()):
                hint = (
                    "; Label Studio refuses local addresses unless started with LABEL_STUDIO_ML_BLOCK_LOCAL_IP=false "
                    "and LABEL_STUDIO_SSRF_PROTECTION_ENABLED=false"
                )
            raise LabelStudioError(
                f"cannot connect project {project_id} to {url}: {error}{hint}", error.status
            ) from None
        return f"project {project_id} connected to {url}"

    def webhook_ready(self, project_id: int, url: str, headers: dict[str, str] | None = None) -> bool:
        """Return whether the project has the webhook ``url`` (Label Studio makes it when the backend is connected,
        unless its SSRF protection refuses a local address); give it ``headers`` (e.g. basic auth) when it lacks them.
        """
        found = self.request("GET", "/api/webhooks/", params={"project": int(project_id)})
        for hook in found if isinstance(found, list) else []:
            if str(hook.get("url", "")).rstrip("/") != url.rstrip("/"):
                continue
            if headers and any((hook.get("headers") or {}).get(k) != v for k, v in headers.items()):
                self.request("PATCH", f"/api/webhooks/{int(hook['id'])}/", json={"headers": headers})
            return True
        return False

    def ml_backends(self, project_id: int) -> list[dict[str, Any]]:
        """Return the ML backend connections of the project (``url``, ``auth_method``, ``basic_auth_user``, ...)."""
        found = self.request("GET", "/api/ml/", params={"project": int(project_id)})
        return [b for b in found if isinstance(b, dict)] if isinstance(found, list) else []

    def wait_until_up(self, seconds: float) -> None:
        """Wait up to ``seconds`` for Label Studio to answer ``/health``.

        Raises:
            LabelStudioError: it did not.
        """
        deadline = time.monotonic() + seconds
        while True:
            try:
                if self.http.get("/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise LabelStudioError(f"Label Studio at {self.url} did not start within {seconds:.0f} s")
            time.sleep(0.5)
