"""``saal label``: a local web page where people label the images SAAL picks while the model retrains.

One module per job:

* :mod:`saal.app.project`: the project folder, its settings file, the image scan and the one-server lock;
* :mod:`saal.app.db`: the database schema (SQLite in WAL mode by default, any SQLAlchemy URL) and transactions;
* :mod:`saal.app.labels`: the append-only label history (label, skip, undo, relabel) and the current state;
* :mod:`saal.app.claims`: time-limited claims that give each annotator a different image;
* :mod:`saal.app.status`: progress, model and job figures for the pages;
* :mod:`saal.app.features`: decoding images, the cached backbone embeddings or pixels the model trains on;
* :mod:`saal.app.order`: random check (audit) images and how they are interleaved into the queue;
* :mod:`saal.app.ranking`: the cold-start ranking, and one retrain + scoring committed as a new model version;
* :mod:`saal.app.model_job`: the model job process (retrains every N labels and on request);
* :mod:`saal.app.supervisor`: starts the model job process and restarts it when it crashes;
* :mod:`saal.app.security`: the access token, annotator sessions, CSRF tokens and safe file paths;
* :mod:`saal.app.exchange`: streaming CSV / JSON / image-folder export and CSV import;
* :mod:`saal.app.server`: the FastAPI application and its pages.

Everything here needs the ``app`` extra (``pip install 'saal[app]'``).

Boxes (detection) later: a label is text in the history (a class name today); a detection project would store each
image's boxes as JSON in the same column, keep the model's proposed boxes per image beside ``predicted``, and give
the page a box editor that accepts or corrects them. The queue, claims, history, job, exports and security do not
depend on what a label is; the project's ``task`` field says which kind it holds.
"""


def default_strategy() -> str:
    """Return the default ``--strategy``: ``auto`` when registered, else ``saal``."""
    from saal.strategies import strategy_names

    return "auto" if "auto" in strategy_names() else "saal"


def default_cold_start() -> str:
    """Return the default ``--cold-start``: ``typiclust`` when registered, else ``coreset`` (greedy k-center on
    the embeddings)."""
    from saal.strategies import strategy_names

    return "typiclust" if "typiclust" in strategy_names() else "coreset"
