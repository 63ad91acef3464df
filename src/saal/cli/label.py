"""``saal label``: label your own images in the browser, in the order SAAL chooses, while the model retrains."""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import sys
from typing import Any

from saal.errors import SaalError

DESCRIPTION = """\
Create (or reopen) a labelling project on FOLDER, a folder of images at any depth, and serve a web page where
people label them: the image the model ranks highest among those nobody else holds, one button per class (keys
1-9, then 0 for the 10th), skip (s), undo (Backspace), each image's history (h), progress per class, a page of
labelled images with filters to fix mistakes, and CSV / JSON exports.

Labels go to an append-only history in FOLDER/.saal-label/labels.db (SQLite, WAL mode) or in --db; a server
killed at any moment restarts with every confirmed label. A model job in its own process retrains every
--retrain-every new labels (and on "Retrain now"), scores the unlabelled images with --strategy and switches the
ranking to the new model version at once. Before the first model (it needs labels of two classes) the order comes
from --cold-start on the cached image features: it chooses the next 300 images, the rest follow in a seeded random
order. The model is a small head on the embeddings of the offline ImageNet-pretrained EfficientNet-Lite0 (the
'pretrained' extra), else a small CNN trained on the pixels.

A share of the images shown (--audit-share, default 0.1: every 10th) are random check images, drawn uniformly at
random (seeded), never by a strategy. The page shows each model version's accuracy on the check images labelled
after it was trained, which it never saw, with a 95 % interval: an honest figure for the whole folder.

Two commands from a folder of images to labelled data:
  saal label photos/ --classes cat,dog,bird     # then open the address it prints
  saal label photos/ --export labels.csv        # or labels.json, or a new folder (OUT/<class>/...)

The server listens on 127.0.0.1; with --host set to any other address (anything but 127.0.0.1, localhost and ::1,
so 127.0.0.2 too) every request needs the access token it prints. Bad input (no images, other classes than the
project's, a database of another project, a second server on the same project, a busy port, a malformed import
CSV, an export path that cannot be written) is one line on stderr and exit code 2, with nothing written: a new
project whose creation or import fails is removed again.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``saal label`` on the ``saal`` command's subparsers."""
    p = subparsers.add_parser(
        "label",
        help="label your own images in the browser, in the order SAAL picks, while the model retrains",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", metavar="FOLDER", help="the folder of images (the project lives in FOLDER/.saal-label)")
    p.add_argument("--classes", help="comma-separated class names, in key order; required to create a project")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port to listen on; 0 picks a free one (default: 8765)")
    p.add_argument(
        "--token",
        help="the access token required on every request: ASCII letters, digits, . _ ~ - (default: none on "
        "127.0.0.1, localhost and ::1, a random one on any other address)",
    )
    p.add_argument(
        "--db",
        help="a SQLAlchemy database URL, e.g. postgresql://user@host/labels (default: the project's SQLite file)",
    )
    p.add_argument(
        "--strategy",
        help="the strategy spec that ranks images once a model exists, any registered one "
        f"(default: {_default('default_strategy')})",
    )
    p.add_argument(
        "--cold-start",
        metavar="NAME",
        help="the strategy that ranks images before any model, on the image features alone: a cold-start one "
        f"(typiclust, ...), coreset or random (default: {_default('default_cold_start')})",
    )
    p.add_argument(
        "--audit-share",
        type=float,
        help="share of the images shown that are random check images, in [0, 1); 0 turns them off (default: 0.1)",
    )
    p.add_argument("--retrain-every", type=int, help="retrain after this many new labels (default: 20)")
    p.add_argument(
        "--model",
        choices=("auto", "pretrained", "cnn"),
        help="pretrained: a head on EfficientNet-Lite0 embeddings; cnn: the small CNN on pixels; "
        "auto: pretrained when installed (default: auto)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        help="side images are resized to for the model (default: 128; the CNN uses at most 64)",
    )
    p.add_argument(
        "--claim-seconds", type=int, help="how long an image stays reserved for whoever sees it (default: 600)"
    )
    p.add_argument(
        "--seed", type=int, help="seeds the initial random order, the check images and training (default: 0)"
    )
    p.add_argument("--no-model", action="store_true", help="serve without the model job (the order stays as it is)")
    p.add_argument(
        "--export",
        metavar="OUT",
        help="write the labels to OUT and exit: a .csv (file,label,annotator,time) or .json file, or a new or "
        "empty folder OUT/<class>/<file> that saal run --dataset folder:OUT reads (a name without a suffix, or "
        "ending in /); any other suffix is refused",
    )
    p.add_argument(
        "--import",
        dest="import_csv",
        metavar="CSV",
        help="add the labels of a CSV (file,label[,annotator,time]) and exit",
    )
    p.set_defaults(func=run_label)


def _default(name: str) -> str:
    import saal.app  # the package alone: no extra needed to build the parser

    found: str = getattr(saal.app, name)()
    return found


def _updates(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "strategy": args.strategy,
        "cold_start": args.cold_start,
        "audit_share": args.audit_share,
        "retrain_every": args.retrain_every,
        "model": args.model,
        "image_size": args.image_size,
        "claim_seconds": args.claim_seconds,
        "seed": args.seed,
    }


def _bind(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise SaalError(f"--port must lie in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise SaalError(f"--host {host!r} is not an address of this machine") from None
    family, kind, proto, _, address = infos[0]
    # proto IPPROTO_TCP (not 0): asyncio then sets TCP_NODELAY on each connection; without it every keep-alive
    # response waits ~40 ms for the client's delayed ACK (Nagle)
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise SaalError(
            f"cannot listen on {host}:{port} ({error.strerror}); give another --port, or 0 for a free one"
        ) from None
    sock.listen(256)
    return sock


def run_label(args: argparse.Namespace) -> int:
    """Run ``saal label``.

    Returns:
        The exit code: 0.

    Raises:
        SaalError: bad input (see ``saal label --help``), before anything is written.
    """
    from saal.extras import import_extra

    for module in ("fastapi", "uvicorn", "sqlalchemy", "jinja2"):
        import_extra(module, "app", "saal label")
    from pathlib import Path

    from saal.app.project import STATE_DIR, ServerLock, open_project, parse_classes

    classes = parse_classes(args.classes) if args.classes is not None else None
    if args.token is not None:
        from saal.app.security import check_token

        check_token(args.token)
    if args.import_csv is not None:
        from saal.app.exchange import import_source

        import_source(args.import_csv)  # a missing file must not leave a new project behind
    state_dir = Path(args.folder).expanduser().resolve() / STATE_DIR
    serving = args.export is None and args.import_csv is None
    lock = ServerLock(state_dir)
    if serving and state_dir.is_dir():
        lock.acquire(f"starting on {args.host}:{args.port}")  # before anything is written
    sock = _bind(args.host, args.port) if serving else None
    try:
        project = open_project(args.folder, classes=classes, url=args.db, updates=_updates(args))
        try:
            if serving and not lock.held:
                lock.acquire(f"starting on {args.host}:{args.port}")
            if args.import_csv is not None:
                from saal.app.exchange import import_csv

                print(import_csv(project, args.import_csv))
            if args.export is not None:
                from saal.app.exchange import export

                print(export(project, args.export))
        except BaseException:
            project.discard()  # a project created by this command goes again: the retry starts afresh
            raise
        if not serving:
            return 0
        assert sock is not None
        return _serve(project, lock, sock, args)
    finally:
        if sock is not None:
            sock.close()
        lock.release()


def _stoppable_server_class() -> Any:
    import contextlib
    import signal
    from collections.abc import Iterator

    import uvicorn

    class StoppableServer(uvicorn.Server):
        """Uvicorn's server, but SIGINT / SIGTERM make ``run`` return (uvicorn re-raises them, skipping cleanup)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return StoppableServer


def _serve(project: Any, lock: Any, sock: socket.socket, args: argparse.Namespace) -> int:
    import uvicorn

    from saal.app.security import is_loopback, needs_token
    from saal.app.server import create_app
    from saal.app.status import snapshot
    from saal.app.supervisor import JobSupervisor

    host, port = sock.getsockname()[:2]
    loopback = is_loopback(args.host)
    token = args.token if args.token else (secrets.token_urlsafe(24) if needs_token(args.host) else None)
    shown = f"[{host}]" if ":" in str(host) else str(host)
    address = f"http://{'127.0.0.1' if shown == '0.0.0.0' else shown}:{port}/" + (f"?token={token}" if token else "")
    lock.record(address)
    status = snapshot(project.engine, project.classes)
    supervisor = None if args.no_model else JobSupervisor(project.engine, project.state_dir, project.url)
    if supervisor is not None:
        supervisor.start()
    readable = status.total - status.unreadable
    print(
        f"saal label: {project.root}: {status.total} images ({status.unreadable} unreadable), "
        f"{status.labelled} of {readable} labelled, classes {','.join(project.classes)}",
        flush=True,
    )
    print(f"saal label: open {address}  (Ctrl-C stops)", flush=True)
    app = create_app(project, token=token, loopback=loopback)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=1)
    server = _stoppable_server_class()(config)
    try:
        server.run(sockets=[sock])
    finally:
        if supervisor is not None:
            supervisor.stop()
        lock.release()  # removes server.lock (it holds the token) before the exit below skips run_label's finally
    print("saal label: stopped; every confirmed label is saved", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Every label is committed: end now. A normal exit would wait (seconds) for AnyIO's idle worker threads,
    # which are not daemon threads.
    os._exit(0)
