"""K-FAC and EKFAC under DistributedDataParallel on 3 gloo processes with UNEQUAL local batches
(an epoch's last batch): each process's loss is the mean over its own batch, as documented, and
the factors recorded on one step equal one process's on the global batch, in float64 to 1e-10
(DDP's average of the local means is not the global batch's mean gradient, so the parameters
after the step differ; that is DDP's averaging, not K-FAC's). Covered: both placements with
more processes than layers (of different sizes), factored damping, EKFAC's eigenvalues, the
exact Fisher, and gradient accumulation with ``no_sync()`` for all but the last micro-batch.
A Monte-Carlo run saved mid-run resumes exactly from each process's own state_dict, and a
state_dict saved on rank 0 does not hand rank 0's generator to the other processes.
"""

import contextlib
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distributed_helpers import run_on_processes
from natgrad.optim import EKFAC, KFAC

WORLD = 3
GLOBAL_BATCH = 30
SHARDS = [slice(0, 4), slice(4, 20), slice(20, 30)]  # even sizes: 2 equal micro-batches each
STEPS = 8
CONFIGS = [
    {"cls": KFAC},
    {"cls": KFAC, "inverse_placement": "assigned"},
    {"cls": KFAC, "inverse_placement": "assigned", "damping_mode": "factored"},
    {"cls": EKFAC, "inverse_placement": "assigned"},
    {"cls": KFAC, "micro_batches": 2},
    {"cls": EKFAC, "micro_batches": 2},
    {"cls": KFAC, "fisher_type": "exact"},
]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).to(torch.float64)


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(GLOBAL_BATCH, 5, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator),
        )
        for _ in range(STEPS)
    ]


def build(model: nn.Module, config: dict) -> KFAC:
    options = {key: value for key, value in config.items() if key != "cls"}
    micro_batches = options.pop("micro_batches", 1)
    if options.get("fisher_type", "empirical") != "empirical":
        options["likelihood"] = "categorical"
    return config["cls"](
        model,
        factor_decay=0.9,
        inv_update_interval=2,
        damping=0.05,
        accumulation_steps=micro_batches,
        **options,
    )


def accumulate(model: nn.Module, precond: KFAC, inputs, targets, micro_batches: int) -> None:
    """Backward passes over ``micro_batches`` equal parts, each loss its part's mean divided by
    ``micro_batches``; DDP's all-reduce on the last only."""
    parts = list(zip(inputs.chunk(micro_batches), targets.chunk(micro_batches), strict=True))
    for index, (part, labels) in enumerate(parts):
        last = index == len(parts) - 1
        syncing = last or not isinstance(model, DistributedDataParallel)
        with contextlib.nullcontext() if syncing else model.no_sync():
            outputs = model(part)
            if precond.fisher_type != "empirical":
                precond.sample_backward(outputs)
            loss = nn.functional.cross_entropy(outputs, labels) / micro_batches
            loss.backward()


def factors_after_one_step(model: nn.Module, config: dict, shard: slice) -> list:
    """Each layer's factors (and EKFAC's eigenvalues) after one step on ``shard`` of the first
    global batch."""
    precond = build(model, config)
    inputs, targets = global_batches()[0]
    accumulate(model, precond, inputs[shard], targets[shard], config.get("micro_batches", 1))
    precond.step()
    factors = [
        (state.input_factor, state.output_factor, getattr(state, "eigenvalues", None))
        for state in precond.layers
    ]
    precond.remove()
    return factors


def train_mc(model: nn.Module, generator: torch.Generator, shard: slice, resume=None) -> list:
    """Monte-Carlo K-FAC; ``resume(precond, step)`` may replace the preconditioner."""
    precond = KFAC(
        model,
        fisher_type="mc",
        likelihood="categorical",
        generator=generator,
        inv_update_interval=3,
        damping=0.05,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    for step, (inputs, targets) in enumerate(global_batches()):
        if resume is not None:
            precond = resume(precond, step)
        optimizer.zero_grad()
        outputs = model(inputs[shard])
        precond.sample_backward(outputs)
        nn.functional.cross_entropy(outputs, targets[shard]).backward()
        precond.step()
        optimizer.step()
    return [param.detach().clone() for param in model.parameters()]


def resumer(model: nn.Module, rank: int, path: Path, saver: int | None):
    """At step 4, save (each process its own, or only ``saver``) and load into a new
    preconditioner with a new generator state."""

    def resume(precond: KFAC, step: int) -> KFAC:
        if step != 4:
            return precond
        if saver is None or rank == saver:
            torch.save(precond.state_dict(), path / f"state.{rank if saver is None else saver}")
        dist.barrier()
        generator = precond.generator
        generator.manual_seed(12345 + rank)
        fresh_state = generator.get_state()
        precond.remove()
        fresh = KFAC(
            model,
            fisher_type="mc",
            likelihood="categorical",
            generator=generator,
            inv_update_interval=3,
            damping=0.05,
        )
        saved = torch.load(path / f"state.{rank if saver is None else saver}", weights_only=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fresh.load_state_dict(saved)
        kept = torch.equal(generator.get_state(), fresh_state)
        resume.report = (kept, [str(warning.message) for warning in caught])
        return fresh

    return resume


def worker(rank: int, world: int, workdir: str) -> dict:
    shard = SHARDS[rank]
    runs = [
        factors_after_one_step(DistributedDataParallel(make_model()), config, shard)
        for config in CONFIGS
    ]
    path = Path(workdir)
    mc = {}
    for name, saver in (("uninterrupted", -1), ("own", None), ("rank0", 0)):
        model = DistributedDataParallel(make_model())
        generator = torch.Generator().manual_seed(10 + rank)
        resume = None if saver == -1 else resumer(model, rank, path, saver)
        mc[name] = (train_mc(model, generator, shard, resume), getattr(resume, "report", None))
    return {"runs": runs, "mc": mc}


@pytest.fixture(scope="module")
def results_by_rank(tmp_path_factory) -> list[dict]:
    workdir = tmp_path_factory.mktemp("ddp_twins")
    return run_on_processes(worker, (str(workdir),), workdir=workdir, world_size=WORLD)


def test_unequal_local_batches_record_the_global_batch_factors(results_by_rank) -> None:
    for index, config in enumerate(CONFIGS):
        single = factors_after_one_step(make_model(), config, slice(None))
        for result in results_by_rank:
            for expected, actual in zip(single, result["runs"][index], strict=True):
                for want, got in zip(expected, actual, strict=True):
                    if want is None:
                        assert got is None
                        continue
                    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14, msg=config)


def test_each_process_resumes_its_own_monte_carlo_draws(results_by_rank) -> None:
    for result in results_by_rank:
        uninterrupted, _ = result["mc"]["uninterrupted"]
        resumed, (kept, messages) = result["mc"]["own"]
        assert not kept and not messages
        for expected, actual in zip(uninterrupted, resumed, strict=True):
            assert torch.equal(actual, expected)


def test_a_state_dict_saved_on_rank_0_leaves_the_other_generators_alone(results_by_rank) -> None:
    for rank, result in enumerate(results_by_rank):
        _, (kept, messages) = result["mc"]["rank0"]
        if rank == 0:
            assert not kept and not messages
        else:
            assert kept, f"rank {rank} took rank 0's generator state"
            assert len(messages) == 1 and "saved on rank 0" in messages[0]
    first = results_by_rank[0]["mc"]["rank0"][0]
    for other in results_by_rank[1:]:  # the factors and parameters are still the same
        for a, b in zip(first, other["mc"]["rank0"][0], strict=True):
            assert torch.equal(a, b)
