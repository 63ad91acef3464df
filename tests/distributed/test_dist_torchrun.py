"""Scoring over real processes under torchrun (gloo): the same choice and scores as one process (101 items over
2 ranks), a killed rank and its resumed rerun, two nodes on 127.0.0.1, ``saal run``'s acquisitions over two
ranks, and bad input (more ranks than items, a rank with other settings, an unreachable rendezvous, a truncated
shard file) as one line with nothing written."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from saal.cli import main
from saal.core.distributed import init_from_env, is_distributed
from saal.errors import SaalError
from saal.strategies import build_strategy

HERE = Path(__file__).resolve().parent
# torchrun itself, run by this interpreter (its console script may not be on PATH, e.g. under `make test`)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(*args: str, nproc: int = 2, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *args],
        env={**ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


_WORKER = textwrap.dedent(
    """
    import sys
    import torch
    torch.set_num_threads(1)
    import torch.distributed as dist
    from dist_cases import BATCH, STRATEGIES, make_case
    from saal.core import row_store
    from saal.core.distributed import init_from_env, shutdown
    from saal.core.shards import distributed_scoring
    from saal.strategies import build_strategy

    init_from_env("cpu", 60)
    results = {}
    def select(spec, tag):
        model, pool = make_case()
        with distributed_scoring():
            sel = build_strategy(spec, batch_size=BATCH).select(model, pool, 5, 0)
        results[tag] = (sel.indices, sel.scored_indices, sel.scores)
    for spec in STRATEGIES:
        select(spec, spec)
    row_store.IN_MEMORY_BYTES = 0  # every per-item output in a file, gathered in rounds
    for spec in ("coreset", "badge"):
        select(spec, spec + "@disk")
    row_store.IN_MEMORY_BYTES = 64 * 2**20
    from saal.core.scoring_job import ScoringJob
    from saal.errors import SaalError
    try:  # more processes than items: refused on every rank, before anything is scored or written
        ScoringJob({"same": True}).check_items(1)
    except SaalError as exc:
        results["more ranks than items"] = str(exc)
    if dist.get_rank() == 0:
        torch.save(results, sys.argv[1])
    shutdown()
    """
)


@pytest.mark.slow
def test_two_gloo_ranks_choose_exactly_and_score_as_one_process(tmp_path: Path) -> None:
    from dist_cases import BATCH, STRATEGIES, make_case

    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    done = torchrun(str(script), str(tmp_path / "two.pt"))
    assert done.returncode == 0, done.stderr[-3000:]
    two = torch.load(tmp_path / "two.pt", weights_only=False)
    assert two.pop("more ranks than items").startswith("2 processes for 1 items to score")
    for tag, (indices, scored, scores) in two.items():
        spec = tag.split("@")[0]
        model, pool = make_case()
        one = build_strategy(spec, batch_size=BATCH).select(model, pool, 5, 0)
        np.testing.assert_array_equal(indices, one.indices, err_msg=tag)
        np.testing.assert_array_equal(scored, one.scored_indices, err_msg=tag)
        # the same batches in another process: equal up to rounding (the choices above stay exact)
        np.testing.assert_allclose(scores, one.scores, rtol=1e-6, atol=1e-7, err_msg=tag)
    assert set(two) == {*STRATEGIES, "coreset@disk", "badge@disk"}


def _score_args(out: Path, *extra: str) -> list[str]:
    # --quiet: no progress lines among the one-line errors these tests read
    return ["score", "--strategy", "entropy", "--batch-size", "4", "--k", "6", "--quiet", "--out", str(out), *extra]


@pytest.mark.slow
def test_a_killed_rank_stops_the_job_and_the_rerun_resumes_to_the_one_process_result(tmp_path: Path) -> None:
    out = tmp_path / "two.csv"
    killed = _two_ranks(_score_args(out), _score_args(out), env={"SAAL_KILL_RANK_AFTER_PIECES": "1:1"})
    assert killed[1][0] == -9  # the kernel's SIGKILL, as an OOM kill or a lost node
    code, err = killed[0]
    assert code == 2 and err.strip().startswith("saal: error: rank 0: another rank stopped while scoring")
    assert "run the same command again to resume" in err and "\n" not in err.strip()
    assert not out.exists(), "nothing is written when a rank fails"
    assert any((tmp_path / "two.csv.parts").glob("scan000-*.pt")), "finished pieces are kept"
    again = _two_ranks(_score_args(out), _score_args(out), stdout=True)
    assert [code for code, _ in again] == [0, 0], again[0][1][-2000:]
    assert "resumed: reused" in again[0][1]
    assert not (tmp_path / "two.csv.parts").exists()
    assert main(_score_args(tmp_path / "one.csv")) == 0
    _same_scores_csv(out, tmp_path / "one.csv")


@pytest.mark.slow
def test_two_nodes_on_loopback_give_the_one_process_result(tmp_path: Path) -> None:
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [
                *TORCHRUN,
                "--nnodes=2",
                f"--node_rank={r}",
                "--nproc_per_node=1",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                "--rdzv-conf=timeout=60",
                "-m",
                "saal",
                *_score_args(tmp_path / "two.csv"),
            ],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=120)
        assert node.returncode == 0, err[-3000:]
    assert main(_score_args(tmp_path / "one.csv")) == 0
    _same_scores_csv(tmp_path / "two.csv", tmp_path / "one.csv")


def _same_scores_csv(got: Path, want: Path) -> None:
    """Assert two ``saal score`` CSVs list the same items, choices and picks, and scores equal up to rounding
    (computed by other processes, they need not agree to the last bit)."""
    rows = [list(csv.DictReader(path.read_text().splitlines())) for path in (got, want)]
    assert len(rows[0]) == len(rows[1]) > 0
    keys = ("dataset_index", "chosen", "pick")
    assert [[r[k] for k in keys] for r in rows[0]] == [[r[k] for k in keys] for r in rows[1]]
    np.testing.assert_allclose(*([float(r["score"]) for r in part] for part in rows), rtol=1e-6, atol=1e-7)


def _two_ranks(
    *args_of_rank: list[str], env: dict[str, str] | None = None, stdout: bool = False
) -> list[tuple[int, str]]:
    """Start rank 0 and rank 1 by hand, with the variables torchrun sets; return each one's exit code and stderr
    (its stdout then stderr with ``stdout``)."""
    shared = {**ENV, **(env or {}), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", "saal", *args],
            env={**shared, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r, args in enumerate(args_of_rank)
    ]
    done = [rank.communicate(timeout=120) for rank in ranks]
    return [(rank.returncode, (out or "") + err) for rank, (out, err) in zip(ranks, done, strict=True)]


@pytest.mark.slow
def test_a_rank_with_other_settings_is_refused_on_every_rank(tmp_path: Path) -> None:
    for code, err in _two_ranks(*(_score_args(tmp_path / "s.csv", "--k", str(5 + r)) for r in range(2))):
        assert code == 2
        assert err.strip() == (
            "saal: error: rank 1 was given other options than rank 0 (k: 6 vs 5); give every rank the same command"
        )
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.slow
def test_an_unreachable_rendezvous_times_out_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SaalError, match=r"rank 1 of 2 could not join the process group at 127\.0\.0\.1:\d+ within 1 s"):
        init_from_env("cpu", timeout_s=1)
    assert not is_distributed()


def test_a_truncated_shard_file_is_one_line_and_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "scan000-0000000000-0000000256.pt").write_bytes(b"PK\x03\x04 cut short")
    assert main(_score_args(tmp_path / "s.csv", "--work-dir", str(parts))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("saal: error: shard file") and "truncated or corrupt" in err and "\n" not in err
    assert not (tmp_path / "s.csv").exists()


def test_a_work_folder_that_cannot_be_created_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(_score_args(tmp_path / "s.csv", "--work-dir", str(blocker / "parts"))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("saal: error: cannot create work folder") and "\n" not in err
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.slow
def test_saal_run_acquires_over_two_ranks_exactly_as_one_process(tmp_path: Path) -> None:
    args = ["run", "--dataset", "digits", "--strategies", "entropy,coreset", "--seeds", "1", "--rounds", "2",
            "--epochs", "2", "--initial", "20", "--query", "5", "--quiet"]  # fmt: skip
    done = torchrun("-m", "saal", *args, "--out", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("results:") == 1, "rank 0 alone reports and writes"
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    for strategy in ("entropy", "coreset"):
        one, two = (
            json.loads((tmp_path / w / strategy / "seed-0" / "rounds.json").read_text()) for w in ("one", "two")
        )
        assert [r["chosen"] for r in _rows(one)] == [r["chosen"] for r in _rows(two)]
        assert [r["accuracy"] for r in _rows(one)] == [r["accuracy"] for r in _rows(two)]


def _rows(record: object) -> list[dict[str, object]]:
    return record["rounds"] if isinstance(record, dict) else record  # type: ignore[return-value,index]
