"""natgrad under ``torch.set_default_device``: the CPU-only parts (GLM estimators, evolution
strategies) keep their tensors on the CPU, and seeded initialisations and draws with a CPU
generator give the same result whatever the default device.

Each test runs the same computation with the CPU as the default device and with another one,
and compares. ``"meta"`` stands in for a GPU where none is present: a tensor created there
without an explicit device cannot be read, so every such tensor in a CPU-only path fails the
test. CUDA cases run where CUDA is available.
"""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym
import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from torch import nn

import natgrad
from devices import CUDA_ONLY
from natgrad.es import minimize
from natgrad.es.objectives import rosenbrock
from natgrad.optim import KFAC
from natgrad.rl import make_policy

OTHER_DEFAULTS = ["meta", pytest.param("cuda", marks=CUDA_ONLY)]


def under_default(device: str, compute: Callable[[], object]) -> object:
    """``compute()`` with ``device`` as torch's default device: the same factory-function
    default as ``torch.set_default_device(device)``, for this block only."""
    with torch.device(device):
        return compute()


def glm_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    features, labels = load_breast_cancer(return_X_y=True)
    features = features[:200, :6] / features[:200, :6].max(axis=0)
    counts = np.random.default_rng(0).poisson(np.exp(features @ np.linspace(-1, 1, 6)))
    return features, labels[:200], counts


@pytest.mark.parametrize("device", OTHER_DEFAULTS)
def test_glm_estimators_fit_on_the_cpu_whatever_the_default_device(device: str) -> None:
    features, labels, counts = glm_data()

    def fit_both() -> tuple[np.ndarray, ...]:
        logistic = natgrad.LogisticRegression(C=10.0).fit(features, labels)
        poisson = natgrad.PoissonRegression(C=10.0).fit(features, counts)
        return (
            logistic.predict_proba(features),
            logistic.coef_bse_,
            poisson.predict(features),
            poisson.coef_bse_,
        )

    expected = fit_both()
    got = under_default(device, fit_both)
    for got_array, expected_array in zip(got, expected, strict=True):
        np.testing.assert_array_equal(got_array, expected_array)


def adam_steps_on_a_meta_default() -> bool:
    """Whether ``torch.optim.Adam`` steps CPU parameters under a meta default device (older
    torch releases keep its step counter on the default device, which the meta stand-in then
    cannot read)."""
    parameter = nn.Parameter(torch.zeros(1, device="cpu"))
    parameter.grad = torch.ones(1, device="cpu")
    optimizer = torch.optim.Adam([parameter])
    try:
        under_default("meta", optimizer.step)
    except RuntimeError:
        return False
    return True


PNMF_DEFAULTS = [
    pytest.param(
        "meta",
        marks=pytest.mark.skipif(
            not adam_steps_on_a_meta_default(),
            reason="this torch keeps Adam's step counter on the default device",
        ),
    ),
    pytest.param("cuda", marks=CUDA_ONLY),
]


@pytest.mark.parametrize("device", PNMF_DEFAULTS)
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_pnmf_on_the_cpu_whatever_the_default_device(device: str) -> None:
    counts = np.random.default_rng(0).poisson(3.0, size=(30, 8))

    def fit() -> np.ndarray:
        pnmf = natgrad.PNMF(n_components=2, max_iter=10, random_state=0, device="cpu")
        return pnmf.fit_transform(counts)

    np.testing.assert_array_equal(under_default(device, fit), fit())


@pytest.mark.parametrize("method", ["xnes", "snes"])
@pytest.mark.parametrize("device", OTHER_DEFAULTS)
def test_evolution_strategies_run_on_the_cpu_whatever_the_default_device(
    device: str, method: str
) -> None:
    def run() -> natgrad.es.ESResult:
        return minimize(
            rosenbrock, [0.5, -0.5, 1.5], method=method, max_evaluations=600, random_state=3
        )

    expected = run()
    got = under_default(device, run)
    assert got.x.device.type == "cpu"
    torch.testing.assert_close(got.x, expected.x, rtol=0, atol=0)
    assert got.history == expected.history


@CUDA_ONLY
def test_a_vectorized_objective_may_return_its_values_on_a_gpu() -> None:
    def on_gpu(samples: torch.Tensor) -> torch.Tensor:
        return rosenbrock(samples.to("cuda"))

    expected = minimize(
        rosenbrock, [0.5, -0.5], vectorized=True, max_evaluations=300, random_state=1
    )
    got = minimize(on_gpu, [0.5, -0.5], vectorized=True, max_evaluations=300, random_state=1)
    torch.testing.assert_close(got.x, expected.x)


@CUDA_ONLY
def test_a_policy_seeded_by_a_cpu_generator_is_the_same_under_a_cuda_default() -> None:
    def build() -> nn.Module:
        return make_policy(gym.make("Pendulum-v1"), (8, 8), torch.Generator().manual_seed(0))

    expected = build()
    got = under_default("cuda", build)
    for got_param, expected_param in zip(got.parameters(), expected.parameters(), strict=True):
        assert got_param.device.type == "cuda"
        torch.testing.assert_close(got_param.cpu(), expected_param, rtol=0, atol=0)


def classifier_and_batch() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A float64 classifier and a batch, drawn on the CPU, on the default device."""
    device = torch.get_default_device()
    with torch.device("cpu"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        inputs = torch.randn(32, 6, dtype=torch.float64)
        targets = torch.randint(0, 3, (32,))
    return model.to(device), inputs.to(device), targets.to(device)


@CUDA_ONLY
@pytest.mark.parametrize("structure", ["kfac", "ekfac", "diag"])
def test_monte_carlo_fisher_with_a_cpu_generator_under_a_cuda_default(structure: str) -> None:
    """The K-FAC builders' weight-locality probe and the Monte-Carlo targets draw with CPU
    generators: under a CUDA default they must still draw on the CPU."""

    def build() -> torch.Tensor:
        model, inputs, _ = classifier_and_batch()
        generator = torch.Generator().manual_seed(0)
        fisher = natgrad.fisher(
            model, inputs, "categorical", kind="mc", structure=structure, generator=generator
        )
        return fisher.to_dense()

    expected = build()
    got = under_default("cuda", build)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), expected)


@CUDA_ONLY
def test_kfac_training_with_a_cpu_generator_under_a_cuda_default() -> None:
    def train() -> list[torch.Tensor]:
        model, inputs, targets = classifier_and_batch()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        precond = KFAC(
            model,
            fisher_type="mc",
            likelihood="categorical",
            generator=torch.Generator().manual_seed(0),
            damping=0.1,
        )
        for _ in range(3):
            optimizer.zero_grad()
            outputs = model(inputs)
            precond.sample_backward(outputs)
            nn.functional.cross_entropy(outputs, targets).backward()
            precond.step()
            optimizer.step()
        return [param.detach().cpu() for param in model.parameters()]

    expected = train()
    got = under_default("cuda", train)
    for got_param, expected_param in zip(got, expected, strict=True):
        torch.testing.assert_close(got_param, expected_param)
