"""natgrad's optimizers with options of their own (a model, a likelihood, a generator, step
counters) survive ``copy.deepcopy`` and ``pickle``: ``torch.optim.Optimizer`` keeps only its
defaults, state and parameter groups in a copy, and the copies failed at their next step."""

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

from kfac_training import fisher_options, train_steps
from natgrad.expfam import Gaussian
from natgrad.optim import (
    EKFAC,
    KFAC,
    AdaHessian,
    NaturalGradient,
    NaturalGradientDescent,
    QuadraticModelOptimizer,
    Shampoo,
)

# AdaHessian needs backward(create_graph=True), about which torch warns (a parameter-gradient
# reference cycle, broken by zero_grad())
pytestmark = pytest.mark.filterwarnings(
    "ignore:Using backward\\(\\) with create_graph=True:UserWarning"
)
DTYPE = torch.float64
OPTIMIZERS = ["NaturalGradient", "QuadraticModelOptimizer", "Shampoo", "AdaHessian"]


def _make(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "NaturalGradient":
        return NaturalGradient(model, "categorical", lr=0.5, damping=0.1)
    if name == "QuadraticModelOptimizer":
        return QuadraticModelOptimizer(model, "categorical", damping_adaptation_interval=2)
    if name == "Shampoo":
        return Shampoo(model.parameters(), lr=0.1, update_freq=2)
    generator = torch.Generator().manual_seed(7)
    return AdaHessian(model.parameters(), lr=0.05, n_samples=2, generator=generator)


def _train(name: str, model: nn.Module, optimizer, steps: int) -> None:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(12, 3, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 3, (12,), generator=generator)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward(create_graph=name == "AdaHessian")
        return loss

    for _ in range(steps):
        if name in ("Shampoo", "AdaHessian"):
            closure()
            optimizer.step()
        else:
            optimizer.step(closure)


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_copied_model_and_optimizer_continue_as_the_originals(name: str, copier: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    optimizer = _make(name, model)
    _train(name, model, optimizer, steps=2)
    pair = (model, optimizer)
    twin_model, twin = (
        copy.deepcopy(pair) if copier == "deepcopy" else pickle.loads(pickle.dumps(pair))
    )
    _train(name, model, optimizer, steps=3)
    _train(name, twin_model, twin, steps=3)
    for param, copied in zip(model.parameters(), twin_model.parameters(), strict=True):
        torch.testing.assert_close(copied, param, rtol=0, atol=0)
    assert twin.counters == optimizer.counters


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
def test_a_copied_natural_gradient_descent_continues_as_the_original(copier: str) -> None:
    """Exponential-family parameters fitted to a target Gaussian by KL: the copy (with its
    parameters) takes the original's steps and keeps its counters."""
    target = Gaussian(
        torch.tensor(1.5, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    )
    start = Gaussian(torch.tensor(0.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))
    theta = [param.detach().clone().requires_grad_(True) for param in start.natural_params]
    optimizer = NaturalGradientDescent(theta, family=Gaussian, lr=0.3)

    def train(optimizer: NaturalGradientDescent, steps: int) -> list[torch.Tensor]:
        params = optimizer.param_groups[0]["params"]
        for _ in range(steps):
            optimizer.zero_grad()
            Gaussian.from_natural(*params).kl(target).backward()
            optimizer.step()
        return params

    train(optimizer, steps=2)
    twin = (
        copy.deepcopy(optimizer) if copier == "deepcopy" else pickle.loads(pickle.dumps(optimizer))
    )
    for ours, theirs in zip(train(twin, 3), train(optimizer, 3), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert twin.counters == optimizer.counters


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
@pytest.mark.parametrize("preconditioner", [KFAC, EKFAC])
def test_a_copied_model_preconditioner_and_optimizer_continue_as_the_originals(
    preconditioner, fisher_type: str, copier: str
) -> None:
    """The copy's preconditioner hooks the copied layers (attention included) and takes the
    original's steps; the copy used to carry only inert hooks, record nothing and pass its
    gradients through (with a warning), and pickling failed on weak references."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True),
        nn.Flatten(),
        nn.Linear(12, 3),
    ).double()
    options = fisher_options(fisher_type, seed=3)
    precond = preconditioner(model, damping=0.1, inv_update_interval=2, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(8, 3, 4, generator=generator, dtype=DTYPE)
    targets = torch.randint(0, 3, (8,), generator=generator)
    train_steps(model, precond, optimizer, inputs, targets, steps=3)
    trio = (model, precond, optimizer)
    twin_model, twin_precond, twin_optimizer = (
        copy.deepcopy(trio) if copier == "deepcopy" else pickle.loads(pickle.dumps(trio))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_steps(model, precond, optimizer, inputs, targets, steps=3)
        train_steps(twin_model, twin_precond, twin_optimizer, inputs, targets, steps=3)
    for param, copied in zip(model.parameters(), twin_model.parameters(), strict=True):
        torch.testing.assert_close(copied, param, rtol=0, atol=0)
