"""The acquisition step of ``saal run`` spread over the ranks ``torchrun`` started; everything else on rank 0.

Rank 0 runs the experiment as one process would (training, evaluation, files, resume). At each
acquisition it calls :func:`acquire`, which sends the model, the strategy (with what it learned)
and the pool's labelling state to the other ranks; every rank then runs the same
``strategy.select`` inside :func:`saal.core.shards.distributed_scoring`, so each scores its
contiguous share of the pool and all of them reach rank 0's choice. The other ranks run
:meth:`AcquisitionService.serve` until rank 0 says it is done. Training stays in one process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from saal.core.distributed import (
    DEFAULT_TIMEOUT_S,
    broadcast_object,
    check_same_everywhere,
    get_rank,
    get_world_size,
    init_from_env,
    is_distributed,
    patient_group,
    shutdown,
)
from saal.core.shards import distributed_scoring
from saal.errors import SaalError

if TYPE_CHECKING:
    from saal.pool import Pool
    from saal.strategies.base import Selection, Strategy

_STOP = "stop"
# the service's patient group on this rank, for :func:`acquire` (which the experiment loop calls)
_PATIENT: dict[str, Any] = {}


def acquire(strategy: Strategy, model: nn.Module, pool: Pool, k: int, rng: np.random.Generator) -> Selection:
    """Return ``strategy.select(model, pool, k, rng)``, scored by every rank when a process group is up.

    Called on rank 0 only (the other ranks are in :meth:`AcquisitionService.serve`); without a
    process group it is exactly ``strategy.select``.

    Raises:
        SaalError: what ``select`` raises; a rank that stopped while scoring.
    """
    if not is_distributed() or get_world_size() == 1:
        return strategy.select(model, pool, k, rng)
    request = {
        "strategy": strategy,
        "model": model,
        "task": pool.task,
        "pool": pool.state.state_dict(),
        "k": int(k),
        "rng": rng.bit_generator.state,
    }
    _collective(broadcast_object, request, 0, _PATIENT.get("group"))
    with distributed_scoring():
        selection: Selection = _collective(strategy.select, model, pool, k, rng)
    return selection


class AcquisitionService:
    """Joins the process group for ``saal run`` and, on ranks other than 0, serves acquisitions.

    Args:
        settings: the run's settings (every rank must get the same).
        device: the device the ranks score on (gloo on CPU, NCCL on CUDA).
        timeout_s: how long to wait for the other ranks to join; the ranks serving rank 0 wait
            in each exchange as long as the process group's timeout (this too).

    Raises:
        SaalError: the group cannot be joined in time, or a rank was given other settings.
    """

    def __init__(self, settings: dict[str, Any], *, device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        init_from_env(device, timeout_s)
        self.rank, self.world_size = get_rank(), get_world_size()
        try:
            check_same_everywhere(settings, "settings")
        except BaseException:
            shutdown()
            raise
        # requests wait while rank 0 trains a round, which may take far longer than the join timeout
        self.group = patient_group()
        _PATIENT["group"] = self.group

    @property
    def is_main(self) -> bool:
        """Whether this rank runs the experiment (rank 0)."""
        return self.rank == 0

    def serve(self, dataset: Callable[[], Dataset[Any]]) -> int:
        """On a rank other than 0: score every acquisition rank 0 sends, until it is done.

        Args:
            dataset: returns the pool's dataset (called once, at the first request).

        Returns:
            How many acquisitions this rank helped score.

        Raises:
            SaalError: rank 0 stopped while this rank waited or scored.
        """
        from saal.pool import Pool  # the pool sits above core: imported when serving

        served = 0
        data: Dataset[Any] | None = None
        while True:
            request = _collective(broadcast_object, None, 0, self.group)
            if request == _STOP:
                return served
            data = dataset() if data is None else data
            pool = Pool(data, task=request["task"])
            pool.state.load_state_dict(request["pool"])
            rng = np.random.default_rng()
            rng.bit_generator.state = request["rng"]
            with distributed_scoring():
                _collective(request["strategy"].select, request["model"], pool, request["k"], rng)
            served += 1

    def stop(self) -> None:
        """On rank 0: tell the serving ranks the experiment is over (once), then leave the group."""
        if is_distributed():
            if self.is_main:
                with contextlib.suppress(RuntimeError):  # the others are gone already: nothing left to tell
                    broadcast_object(_STOP, 0, self.group)
            _PATIENT.pop("group", None)
            shutdown()


def _collective(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except SaalError:
        raise
    except RuntimeError as exc:  # gloo / NCCL: a peer closed its connection or timed out
        lines = str(exc).strip().splitlines()
        raise SaalError(
            f"rank {get_rank()}: another rank stopped during an acquisition ({lines[0][:200] if lines else exc}); "
            "run the same command again to resume from the last finished round"
        ) from None
