"""Run a function on several gloo processes on one machine, for tests of data-parallel code.

:func:`run_on_processes` starts the processes, joins them into one default process group and
returns what each process's function returned. Three things make it reliable when several
pytest-xdist workers launch process groups at the same time:

- **Rendezvous through a file** (``FileStore`` in a fresh directory), not a TCP port: a port
  found free and closed again, to be handed to ``init_process_group``, can be taken by another
  process before the store binds it.
- **``torch.distributed.nn`` imported before the process group exists.** Its functions take
  ``group=group.WORLD`` as a default argument, evaluated at import (torch 2.13). Imported later
  (``torch._dynamo`` imports it, and the first ``torch.optim`` optimizer or
  ``DistributedDataParallel`` imports ``torch._dynamo``), they hold the default process group,
  which ``destroy_process_group`` then cannot free: its gloo threads outlive the call. In a
  ``spawn`` child they run on into interpreter shutdown, where a worker thread still finishing
  its last collective can abort the process ("terminate called without an active exception",
  SIGABRT).
- **Orderly teardown**: every process saves its result, waits at a barrier, then destroys the
  process group, so no process tears its connections down while another still uses them. A
  process whose function raises skips both and exits with the error, which
  ``torch.multiprocessing`` reports after stopping the other processes.
"""

from __future__ import annotations

import faulthandler
import importlib
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Bounds the rendezvous and every collective: a process stuck waiting on a dead peer fails
# instead of hanging until pytest's own timeout.
TIMEOUT = timedelta(minutes=5)
FAILURE_TIMEOUT = timedelta(seconds=10)  # tests of one process failing: the others fail fast


def default_start_method() -> str:
    """``"fork"`` where the platform has it (the workers share the parent's imports), else
    ``"spawn"``; also ``"spawn"`` where CUDA is available: a backward pass there starts the
    autograd engine's device threads, after which a forked child refuses to run autograd
    ("Unable to handle autograd's threading in combination with fork-based
    multiprocessing"), and a pytest-xdist worker has usually run a backward pass before."""
    if torch.cuda.is_available() or "fork" not in mp.get_all_start_methods():
        return "spawn"
    return "fork"


def run_on_processes(
    worker: Callable[..., Any],
    args: Sequence[Any] = (),
    *,
    workdir: Path,
    world_size: int = 2,
    start_method: str | None = None,
    timeout: timedelta = TIMEOUT,
) -> list[Any]:
    """Call ``worker(rank, world_size, *args)`` on ``world_size`` gloo processes.

    Parameters
    ----------
    worker : callable
        Module-level function (``spawn`` pickles it by name); its return value must be
        picklable by ``torch.save``. It runs with ``torch.distributed`` initialised
        (default group over all processes) and one intra-op thread.
    args : sequence
        Further arguments of ``worker``, the same on every process.
    workdir : Path
        Empty directory for the rendezvous file and the results.
    world_size : int
    start_method : {"fork", "spawn", "forkserver"}, optional
        Defaults to :func:`default_start_method`.
    timeout : timedelta
        Bound on the rendezvous and every collective (:data:`TIMEOUT` by default); tests of
        failures give a short one, so that a process left waiting fails within seconds.

    Returns
    -------
    list
        ``worker``'s return value on each process, by rank.
    """
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    method = start_method or default_start_method()
    if method == "fork":
        # torch.optim and DistributedDataParallel import torch._dynamo lazily, which takes
        # seconds per process: import it once here, for the forked workers to share.
        importlib.import_module("torch._dynamo")
    mp.start_processes(
        _process_main,
        args=(worker, tuple(args), world_size, str(workdir), timeout),
        nprocs=world_size,
        join=True,
        start_method=method,
    )
    return [
        torch.load(_result_path(workdir, rank), weights_only=False) for rank in range(world_size)
    ]


def _result_path(workdir: Path | str, rank: int) -> Path:
    return Path(workdir, f"result.{rank}.pt")


def _process_main(
    rank: int,
    worker: Callable[..., Any],
    args: tuple,
    world_size: int,
    workdir: str,
    timeout: timedelta,
) -> None:
    if not faulthandler.is_enabled():  # a native crash then prints every thread's Python stack
        faulthandler.enable(all_threads=True)
    torch.set_num_threads(1)
    importlib.import_module("torch.distributed.nn")  # before init: see the module docstring
    dist.init_process_group(
        "gloo",
        init_method=Path(workdir, "rendezvous").as_uri(),
        rank=rank,
        world_size=world_size,
        timeout=timeout,
    )
    torch.save(worker(rank, world_size, *args), _result_path(workdir, rank))
    dist.barrier()
    dist.destroy_process_group()


def small_conv_classifier() -> torch.nn.Module:
    """A float64 Conv2d–Linear classifier of 3 × 3 images into 3 classes (seed 0)."""
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3)
    ).to(torch.float64)


def classifier_batches(size: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` global batches of ``size`` float64 3 × 3 images and class labels (seed 1)."""
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(size, 1, 3, 3, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (size,), generator=generator),
        )
        for _ in range(steps)
    ]


def outcome(action: Callable[[], Any]) -> tuple[str, str]:
    """``("ok", "")``, or the name and message of the exception ``action`` raised (tests
    compare the processes' exceptions)."""
    try:
        action()
    except Exception as error:  # the tests compare the processes' exceptions
        return type(error).__name__, str(error)
    return "ok", ""
