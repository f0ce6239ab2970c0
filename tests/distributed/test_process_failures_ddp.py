"""An exception raised on one process only is raised on every process, with its message.

Process 1 alone fails in local work that comes before a collective (its shard's targets
outside the likelihood's support, non-finite inputs or outputs, an eigendecomposition or a
Cholesky factorisation that only the owner of a factor runs, a Monte-Carlo K-FAC step without
``sample_backward``, a Hutchinson estimate without a graph). Before, process 0 waited in the
next collective until the process group's timeout (here 10 seconds: a gloo timeout error),
then the processes went apart. Now process 1 raises its own exception and process 0 a
:class:`~natgrad.distributed.ProcessFailure` saying ``"process 1 failed: <Type>: <message>"``,
at the collective that both reach. Good steps before (and, for ``fisher``/NaturalGradient,
after) the failure leave both processes with the same parameters as one process on the
global batch, bitwise equal to each other.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

import natgrad.optim.kfac as kfac_module
from distributed_helpers import FAILURE_TIMEOUT, outcome, run_on_processes
from natgrad.curvature import fisher
from natgrad.distributed import GlobalBatch
from natgrad.optim import KFAC, AdaHessian, NaturalGradient, QuadraticModelOptimizer
from natgrad.optim.kfac_layers import KroneckerLayerState

SHARES = (5, 7)
GLOBAL = sum(SHARES)
IN, HIDDEN, OUT = 4, 5, 3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT)).double()


def global_batch(seed: int = 1) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(GLOBAL, IN, generator=generator, dtype=torch.float64)
    return inputs, torch.randint(0, OUT, (GLOBAL,), generator=generator)


def share(rank: int) -> slice:
    start = sum(SHARES[:rank])
    return slice(start, start + SHARES[rank])


def assert_agreed(outcomes: list[tuple[str, str]], kind: str) -> None:
    """Process 1 raised ``kind``; process 0 a ProcessFailure quoting it."""
    (type0, message0), (type1, message1) = outcomes
    assert type1 == kind, outcomes
    assert type0 == "ProcessFailure", outcomes
    assert message0 == f"process 1 failed: {kind}: {message1}"


# -- fisher(global_batch=...) and NaturalGradient ----------------------------------------------
FISHER_CASES = [  # (structure, kind, poisoned input) on process 1
    ("dense", "empirical", "targets"),
    ("kfac", "empirical", "targets"),
    ("implicit", "empirical", "targets"),
    ("block", "exact", "nan"),
    ("ekfac", "empirical", "targets"),
    ("dense", "mc", "nan"),
]


def poisoned(inputs: Tensor, targets: Tensor, poison: str) -> tuple[Tensor, Tensor]:
    inputs, targets = inputs.clone(), targets.clone()
    if poison == "targets":
        targets[-1] = OUT + 2  # no class of the categorical likelihood
    else:
        inputs[-1, 0] = float("nan")
    return inputs, targets


def fisher_worker(rank: int, world_size: int) -> dict:
    model = make_model()
    inputs, targets = global_batch()
    inputs, targets = inputs[share(rank)], targets[share(rank)]
    outcomes = []
    for structure, kind, poison in FISHER_CASES:
        bad = poisoned(inputs, targets, poison) if rank == 1 else (inputs, targets)
        outcomes.append(
            outcome(
                lambda bad=bad, structure=structure, kind=kind: fisher(
                    model,
                    bad[0],
                    kind=kind,
                    structure=structure,
                    targets=bad[1],
                    global_batch=GlobalBatch(),
                )
            )
        )
    good = fisher(model, inputs, kind="empirical", targets=targets, global_batch=GlobalBatch())
    return {"outcomes": outcomes, "good": good.to_dense()}


def test_fisher_failure_on_one_process_is_raised_on_every_process(tmp_path) -> None:
    results = run_on_processes(fisher_worker, workdir=tmp_path, timeout=FAILURE_TIMEOUT)
    for index, (structure, kind, poison) in enumerate(FISHER_CASES):
        outcomes = [result["outcomes"][index] for result in results]
        assert_agreed(outcomes, "ValueError")
        if poison == "targets":
            assert "categorical likelihood" in outcomes[1][1], (structure, kind)
        else:
            assert "NaN" in outcomes[1][1], (structure, kind)
    inputs, targets = global_batch()
    reference = fisher(make_model(), inputs, kind="empirical", targets=targets).to_dense()
    torch.testing.assert_close(results[0]["good"], reference)
    assert torch.equal(results[0]["good"], results[1]["good"])


def natural_gradient_worker(rank: int, world_size: int) -> dict:
    model = make_model()
    optimizer = NaturalGradient(model, likelihood="poisson", kind="empirical", lr=0.1)
    steps = []
    for step, seed in enumerate((1, 2, 3)):
        inputs, _ = global_batch(seed)
        generator = torch.Generator().manual_seed(seed)
        counts = torch.poisson(torch.full((GLOBAL, OUT), 2.0, dtype=torch.float64), generator)
        inputs, counts = inputs[share(rank)], counts[share(rank)]
        if step == 1 and rank == 1:
            counts[0, 0] = -1.0  # outside the Poisson support: a local ValueError

        def closure(inputs=inputs, counts=counts) -> Tensor:
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = (outputs.exp() - counts * outputs).sum() * world_size / GLOBAL
            loss.backward()
            # the gradients of the global batch's mean loss, as DDP would average them
            for param in model.parameters():
                torch.distributed.all_reduce(param.grad)
                param.grad /= world_size
            return loss

        steps.append(
            outcome(lambda closure=closure, counts=counts: optimizer.step(closure, targets=counts))
        )
    params = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    return {"outcomes": steps, "params": params, "counters": dict(optimizer.counters)}


def natural_gradient_reference() -> torch.Tensor:
    """One process on the global batches of the good steps (the failed one changes nothing)."""
    model = make_model()
    optimizer = NaturalGradient(model, likelihood="poisson", kind="empirical", lr=0.1)
    for seed in (1, 3):
        inputs, _ = global_batch(seed)
        generator = torch.Generator().manual_seed(seed)
        counts = torch.poisson(torch.full((GLOBAL, OUT), 2.0, dtype=torch.float64), generator)

        def closure(inputs=inputs, counts=counts) -> Tensor:
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = (outputs.exp() - counts * outputs).sum() / GLOBAL
            loss.backward()
            return loss

        optimizer.step(closure, targets=counts)
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


def test_natural_gradient_failure_on_one_process_is_raised_on_every_process(tmp_path) -> None:
    results = run_on_processes(natural_gradient_worker, workdir=tmp_path, timeout=FAILURE_TIMEOUT)
    assert [result["outcomes"][0] for result in results] == [("ok", "")] * 2
    assert [result["outcomes"][2] for result in results] == [("ok", "")] * 2
    failed = [result["outcomes"][1] for result in results]
    assert_agreed(failed, "ValueError")
    assert "poisson likelihood: targets must be non-negative counts" in failed[1][1]
    assert (
        results[0]["counters"]
        == results[1]["counters"]
        == {"steps": 2, "refused_steps": 0, "rejected_steps": 0}
    )
    assert torch.equal(results[0]["params"], results[1]["params"])
    torch.testing.assert_close(results[0]["params"], natural_gradient_reference())


# -- KFAC ------------------------------------------------------------------------------------
def injected_failure(*args: object, **kwargs: object) -> None:
    raise torch.linalg.LinAlgError("injected: the factorisation failed on this process")


KFAC_CASES = [  # (KFAC options, what fails on process 1 at the third step)
    (
        {"fisher_type": "mc", "likelihood": "categorical", "generator": "seeded"},
        "no sample_backward",
    ),
    ({"inverse_placement": "assigned", "inv_update_interval": 1}, "eigh"),
    (
        {"inverse_placement": "assigned", "damping_mode": "factored", "inv_update_interval": 1},
        "cholesky",
    ),
]


def kfac_run(case: int, rank: int) -> tuple[list[tuple[str, str]], Tensor]:
    """Three K-FAC + SGD steps on this process's share; on process 1 the third step fails."""
    options, failure = KFAC_CASES[case]
    options = dict(options)
    if options.get("generator") == "seeded":
        options["generator"] = torch.Generator().manual_seed(5)
    model = make_model()
    precond = KFAC(model, damping=0.1, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    outcomes = []
    for step in range(3):
        inputs, targets = global_batch(step + 1)
        rows = slice(rank * GLOBAL // 2, (rank + 1) * GLOBAL // 2)  # equal shares
        fails = rank == 1 and step == 2

        def take_step(inputs=inputs[rows], targets=targets[rows], fails=fails) -> None:
            optimizer.zero_grad()
            outputs = model(inputs)
            if options.get("fisher_type") == "mc" and not (
                fails and failure == "no sample_backward"
            ):
                precond.sample_backward(outputs)
            nn.functional.cross_entropy(outputs, targets).backward()
            for param in model.parameters():  # the mean of the shares' mean losses, as in DDP
                torch.distributed.all_reduce(param.grad)
                param.grad /= 2
            originals = (KroneckerLayerState.update_eigens, kfac_module.damped_factor_inverses)
            if fails and failure == "eigh":
                KroneckerLayerState.update_eigens = injected_failure
            if fails and failure == "cholesky":
                kfac_module.damped_factor_inverses = injected_failure
            try:
                precond.step()
            finally:
                KroneckerLayerState.update_eigens, kfac_module.damped_factor_inverses = originals
            optimizer.step()

        outcomes.append(outcome(take_step))
    return outcomes, torch.nn.utils.parameters_to_vector(model.parameters()).detach()


def kfac_worker(rank: int, world_size: int) -> list:
    results = []
    for case in range(len(KFAC_CASES)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            results.append(kfac_run(case, rank))
    return results


def test_kfac_failure_on_one_process_is_raised_on_every_process(tmp_path) -> None:
    results = run_on_processes(kfac_worker, workdir=tmp_path, timeout=FAILURE_TIMEOUT)
    for case, (_, failure) in enumerate(KFAC_CASES):
        (outcomes0, params0), (outcomes1, params1) = results[0][case], results[1][case]
        assert outcomes0[:2] == outcomes1[:2] == [("ok", "")] * 2, failure
        linalg = torch.linalg.LinAlgError.__name__
        kind = "RuntimeError" if failure == "no sample_backward" else linalg
        assert_agreed([outcomes0[2], outcomes1[2]], kind)
        if failure == "no sample_backward":
            assert "sample_backward" in outcomes1[2][1]
        else:
            assert outcomes1[2][1].startswith("injected")
        assert torch.equal(params0, params1)  # the failed step changed no parameter
        if failure != "no sample_backward":  # Monte-Carlo draws differ from one process's
            torch.testing.assert_close(params0, two_step_reference(case))


def two_step_reference(case: int) -> Tensor:
    """The parameters after the first two steps of one process on the global batch."""
    options = dict(KFAC_CASES[case][0])
    if options.get("generator") == "seeded":
        options["generator"] = torch.Generator().manual_seed(5)
    model = make_model()
    precond = KFAC(model, damping=0.1, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        inputs, targets = global_batch(step + 1)
        optimizer.zero_grad()
        outputs = model(inputs)
        if options.get("fisher_type") == "mc":
            precond.sample_backward(outputs)
        nn.functional.cross_entropy(outputs, targets).backward()
        precond.step()
        optimizer.step()
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


# -- QuadraticModelOptimizer ---------------------------------------------------------------------
class Imputed(nn.Module):
    """Replaces missing inputs (NaN) by zeros: the loss is finite, the inputs are not."""

    def forward(self, inputs: Tensor) -> Tensor:
        return torch.nan_to_num(inputs)


def quadratic_worker(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(Imputed(), make_model())
    optimizer = QuadraticModelOptimizer(model, "categorical", damping=0.05)
    outcomes = []
    for step in range(3):
        inputs, targets = global_batch(step + 1)
        inputs, targets = inputs[share(rank)].clone(), targets[share(rank)]
        if step == 1 and rank == 1:
            inputs[0, 0] = float("nan")

        def closure(inputs=inputs, targets=targets) -> Tensor:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs), targets)
            loss.backward()
            for param in model.parameters():
                torch.distributed.all_reduce(param.grad)
                param.grad /= world_size
            return loss

        outcomes.append(outcome(lambda closure=closure: optimizer.step(closure)))
    params = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    return {"outcomes": outcomes, "params": params}


def test_quadratic_model_failure_on_one_process_is_raised_on_every_process(tmp_path) -> None:
    results = run_on_processes(quadratic_worker, workdir=tmp_path, timeout=FAILURE_TIMEOUT)
    failed = [result["outcomes"][1] for result in results]
    assert_agreed(failed, "ValueError")
    assert "NaN" in failed[1][1] or "finite" in failed[1][1]
    for index in (0, 2):
        assert [result["outcomes"][index] for result in results] == [("ok", "")] * 2
    assert torch.equal(results[0]["params"], results[1]["params"])


# -- AdaHessian --------------------------------------------------------------------------------
def adahessian_worker(rank: int, world_size: int) -> dict:
    model = make_model()
    optimizer = AdaHessian(model.parameters(), lr=0.05, generator=torch.Generator().manual_seed(3))
    outcomes = []
    for step in range(3):
        inputs, targets = global_batch(step + 1)
        inputs, targets = inputs[share(rank)], targets[share(rank)]
        graph = not (step == 1 and rank == 1)  # process 1 forgets create_graph=True

        def closure(inputs=inputs, targets=targets, graph=graph) -> Tensor:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs), targets)
            loss.backward(create_graph=graph)
            return loss

        outcomes.append(outcome(lambda closure=closure: optimizer.step(closure)))
    params = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    return {"outcomes": outcomes, "params": params}


def test_adahessian_failure_on_one_process_is_raised_on_every_process(tmp_path) -> None:
    results = run_on_processes(adahessian_worker, workdir=tmp_path, timeout=FAILURE_TIMEOUT)
    failed = [result["outcomes"][1] for result in results]
    assert_agreed(failed, "RuntimeError")
    assert "create_graph=True" in failed[1][1]
    for index in (0, 2):
        assert [result["outcomes"][index] for result in results] == [("ok", "")] * 2
    assert torch.equal(results[0]["params"], results[1]["params"])
