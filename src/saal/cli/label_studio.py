"""``saal label-studio``: serve saal as a Label Studio ML backend that orders the tasks and pre-labels them."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from saal.errors import SaalError

DESCRIPTION = """\
Serve saal as a Label Studio ML backend (/health, /setup, /predict, /webhook, /metrics). Each connected project is
mirrored in DIR/project-<id> (its images, read once with the token, and a `saal label` project: labels, cached
embeddings, model versions). Its label config must hold one <Image> with one <Choices> (classes) or one
<RectangleLabels> (boxes).

Every annotation reaches saal through Label Studio's webhook; after every --retrain-every new labels (and on
"Start Training") the model retrains in a background process, re-ranks the unlabelled tasks with --strategy and
pushes one prediction per task to Label Studio as a new model version (saal-v1, saal-v2, ...). Each prediction's
score is the task's place in saal's order: sort the Data Manager by "Prediction score" ascending (or set the
project's sampling to "Uncertainty sampling") and label from the top. Before the first model the order comes from
--cold-start, with empty results.

  label-studio start   # with LABEL_STUDIO_ML_BLOCK_LOCAL_IP=false LABEL_STUDIO_SSRF_PROTECTION_ENABLED=false
  saal label-studio --label-studio-url http://localhost:8080 --label-studio-token TOKEN --connect 1

Without --connect, add the model in the project's Settings > Model with the URL printed at start. A Label Studio
that cannot be reached, a refused token, a busy port or a --host other than this machine without --basic-auth is
one line on stderr and exit code 2.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``saal label-studio`` on the ``saal`` command's subparsers."""
    p = subparsers.add_parser(
        "label-studio",
        help="serve saal as a Label Studio ML backend: saal's order as prediction scores, pre-labels, live retraining",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--label-studio-url",
        default=os.environ.get("LABEL_STUDIO_URL", "http://localhost:8080"),
        help="Label Studio's address (default: $LABEL_STUDIO_URL or http://localhost:8080)",
    )
    p.add_argument(
        "--label-studio-token",
        default=os.environ.get("LABEL_STUDIO_API_KEY"),
        help="an access token of Label Studio (Account & Settings; a legacy token or a personal access token; "
        "default: $LABEL_STUDIO_API_KEY)",
    )
    p.add_argument("--dir", default="saal-label-studio", help="the backend's folder (default: ./saal-label-studio)")
    p.add_argument("--db", help="a SQLAlchemy URL for the backend's store (default: DIR/store.db, SQLite)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=9090, help="port to listen on; 0 picks a free one (default: 9090)")
    p.add_argument(
        "--basic-auth",
        metavar="USER:PASS",
        default=os.environ.get("SAAL_BASIC_AUTH"),
        help="require HTTP basic auth (set the same in the connection's Authentication; default: $SAAL_BASIC_AUTH); "
        "required with a --host other than this machine",
    )
    p.add_argument(
        "--connect",
        type=int,
        action="append",
        metavar="PROJECT",
        help="connect the backend to this Label Studio project id (repeatable; same as Settings > Model > Connect)",
    )
    p.add_argument("--public-url", help="the address Label Studio reaches the backend at (default: http://HOST:PORT)")
    _training_options(p)
    p.set_defaults(func=run_label_studio)


def _training_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", help="strategy spec ranking the tasks once a model exists (default: auto or saal)")
    p.add_argument("--box-strategy", default="det-saal", help="strategy for <RectangleLabels> projects (det-saal)")
    p.add_argument("--cold-start", metavar="NAME", help="strategy before any model (default: typiclust or coreset)")
    p.add_argument("--retrain-every", type=int, default=10, help="retrain after this many new annotations (10)")
    p.add_argument("--model", choices=("auto", "pretrained", "cnn"), default="auto", help="see saal label (auto)")
    p.add_argument("--image-size", type=int, default=128, help="side images are resized to for the model (128)")
    p.add_argument("--seed", type=int, default=0, help="seeds training and the cold start (0)")
    p.add_argument("--keep-versions", type=int, default=3, help="keep the predictions of this many newest versions (3)")


def _basic_auth(text: str | None, host: str) -> tuple[str, str] | None:
    from saal.app.security import is_loopback

    if text is None or text == "":
        if not is_loopback(host):
            raise SaalError(
                f"--host {host} lets other machines reach the backend: give --basic-auth USER:PASS too (and the same "
                "user and password in the connection's Authentication in Label Studio)"
            )
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise SaalError("--basic-auth must be USER:PASS, both non-empty")
    return user, password


def _check(args: argparse.Namespace) -> tuple[str, tuple[str, str] | None]:
    from saal.extras import import_extra

    for module in ("fastapi", "uvicorn", "sqlalchemy", "httpx"):
        import_extra(module, "labelstudio", "saal label-studio")
    if args.retrain_every < 1:
        raise SaalError(f"--retrain-every must be at least 1, got {args.retrain_every}")
    if args.keep_versions < 1:
        raise SaalError(f"--keep-versions must be at least 1, got {args.keep_versions}")
    if args.label_studio_token is None:
        raise SaalError(
            "give --label-studio-token (or $LABEL_STUDIO_API_KEY): an access token from Label Studio's "
            "Account & Settings"
        )
    if args.strategy is not None:
        from saal.strategies import build_strategy

        build_strategy(args.strategy)
    return args.label_studio_token, _basic_auth(args.basic_auth, args.host)


def run_label_studio(args: argparse.Namespace) -> int:
    """Run ``saal label-studio``.

    Returns:
        The exit code: 0.

    Raises:
        SaalError: bad input (see ``saal label-studio --help``), before anything is served.
    """
    token, basic_auth = _check(args)
    from saal.app.project import ServerLock
    from saal.cli.label import _bind
    from saal.labelstudio.client import LabelStudio

    ls = LabelStudio(args.label_studio_url, token)
    version = ls.check()  # unreachable or a refused token: one line, exit 2
    folder = Path(args.dir).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    lock = ServerLock(folder)
    lock.acquire(f"saal label-studio starting on {args.host}:{args.port}")
    sock = _bind(args.host, args.port)
    try:
        return _serve(args, ls, version, folder, lock, sock, basic_auth)
    finally:
        sock.close()
        lock.release()


def _serve(
    args: argparse.Namespace,
    ls: Any,
    version: str,
    folder: Path,
    lock: Any,
    sock: Any,
    basic_auth: tuple[str, str] | None,
) -> int:
    import uvicorn

    from saal.app.db import default_url
    from saal.cli.label import _stoppable_server_class
    from saal.labelstudio.backend import Backend
    from saal.labelstudio.mirror import Options
    from saal.labelstudio.server import create_app
    from saal.labelstudio.store import Store

    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in str(host) else str(host)
    address = args.public_url or f"http://{'127.0.0.1' if shown == '0.0.0.0' else shown}:{port}"
    lock.record(f"saal label-studio on {address}")
    store = Store(args.db or default_url(str(folder / "store.db")))
    options = Options(
        strategy=args.strategy,
        box_strategy=args.box_strategy,
        cold_start=args.cold_start,
        retrain_every=args.retrain_every,
        model=args.model,
        image_size=args.image_size,
        seed=args.seed,
        keep_versions=args.keep_versions,
        address=address,
        basic_auth=basic_auth,
    )
    backend = Backend(folder, ls, store, options, _log)
    backend.resume()
    _log(f"serving {address} for Label Studio {version} at {ls.url}; state in {folder}")
    _log(f"connect a project: Settings > Model > Connect Model, URL {address}  (Ctrl-C stops)")
    app = create_app(backend, basic_auth=basic_auth, log=_log)
    server = _stoppable_server_class()(uvicorn.Config(app, log_level="warning", access_log=False))
    if args.connect:
        threading.Thread(target=_connect, args=(server, ls, args.connect, address, basic_auth), daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        backend.stop()
        lock.release()
    _log("stopped; labels, model versions and pushes are saved")
    sys.stdout.flush()
    os._exit(0)  # AnyIO's idle worker threads are not daemons: a normal exit would wait for them


def _connect(server: Any, ls: Any, projects: list[int], address: str, basic_auth: tuple[str, str] | None) -> None:
    """Connect the projects once the server answers (Label Studio calls /setup while connecting)."""
    from saal.labelstudio.client import LabelStudioError

    while not server.started:
        time.sleep(0.05)
    for project in projects:
        try:
            _log(ls.connect(project, address, basic_auth))
        except LabelStudioError as error:
            _log(f"error: {error}")


def _log(message: str) -> None:
    print(f"saal label-studio: {message}", flush=True)
