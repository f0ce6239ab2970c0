"""Every public component of natgrad on a device against the same computation on the CPU.

Each test runs on ``"cpu"`` and, where CUDA is available, on ``"cuda"``: the computation is
done on the device in float32 and compared with the same builder, optimizer or function run
on the CPU in float64 (the oracle), within float32 tolerances. On the CPU this checks the
float32 path against float64; on CUDA it also checks that nothing is created on the wrong
device (a tensor made on the CPU inside would raise "Expected all tensors to be on the same
device"). Random components (Monte-Carlo Fisher, AdaHessian's Rademacher signs) are checked
for reproducibility from a seed on the device. TF32 is switched off for the module, so that
CUDA float32 matrix products and convolutions round as IEEE float32 does.

Not covered here: ``natgrad.rl`` (``tests/rl/test_rl_device.py`` runs it on the device; its
gymnasium environments step on the CPU) and the GLM estimators
(``LogisticRegression``, ``PoissonRegression``: NumPy/SciPy design matrices, no device).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import gammaln
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import natgrad.distributed as ngdist
from devices import CUDA_ONLY, DEVICES
from natgrad import PNMF, fisher, ggn, hessian
from natgrad.curvature import CurvatureOperator, get_likelihood
from natgrad.es import SNES, XNES, ellipsoid, rosenbrock, sphere
from natgrad.expfam import (
    Bernoulli,
    Beta,
    Categorical,
    Dirichlet,
    ExponentialFamily,
    Gamma,
    Gaussian,
    MultivariateGaussian,
    Poisson,
)
from natgrad.linalg import (
    cg,
    damped_solve,
    inverse_pth_root,
    kron_mv,
    psd_matrix_power,
    symmetric_eigh,
)
from natgrad.optim import (
    EKFAC,
    KFAC,
    AdaHessian,
    NaturalGradient,
    NaturalGradientDescent,
    QuadraticModelOptimizer,
    Shampoo,
)

WIDE = torch.float64
NARROW = torch.float32
FISHER_STRUCTURES = ["dense", "diag", "block", "kfac", "ekfac", "implicit"]
LINALG_SETTINGS = settings(max_examples=8, deadline=None)  # the first CUDA call is slow


@pytest.fixture(autouse=True)
def ieee_float32() -> Iterator[None]:
    """Switch TF32 off for matrix products and cuDNN convolutions during one test."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# -- models, data and comparisons ------------------------------------------------------------
def mlp() -> nn.Module:
    """A float64 Linear–Tanh–Linear classifier of 3 features into 3 classes (seed 0)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(WIDE)


def convnet() -> nn.Module:
    """A float64 Conv2d–Tanh–Linear classifier of 1 × 3 × 3 images into 3 classes (seed 0)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4, 3)).to(WIDE)


INPUT_SHAPES: dict[Callable[[], nn.Module], tuple[int, ...]] = {mlp: (3,), convnet: (1, 3, 3)}
NETS = [pytest.param(mlp, id="mlp"), pytest.param(convnet, id="convnet")]


def batch(net: Callable[[], nn.Module], size: int = 8, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Float64 inputs for ``net`` and class labels in ``{0, 1, 2}``, on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(size, *INPUT_SHAPES[net], generator=generator, dtype=WIDE)
    return inputs, torch.randint(0, 3, (size,), generator=generator)


def moved(model: nn.Module, device: str) -> nn.Module:
    """A float32 copy of ``model`` on ``device``."""
    return copy.deepcopy(model).to(device=device, dtype=NARROW)


def narrow(tensor: Tensor, device: str) -> Tensor:
    """``tensor`` on ``device``, floating point as float32."""
    return tensor.to(device=device, dtype=NARROW if tensor.is_floating_point() else tensor.dtype)


def assert_near(actual: Tensor, expected: Tensor, device: str, rtol: float = 2e-4) -> None:
    """``actual`` (computed on ``device``) equals the float64 ``expected`` to float32 accuracy:
    entrywise within ``rtol`` of the entry plus ``rtol`` of the largest entry."""
    assert actual.device.type == device
    assert bool(torch.isfinite(actual).all())
    scale = float(expected.abs().max())
    torch.testing.assert_close(
        actual.detach().cpu().to(WIDE), expected, rtol=rtol, atol=rtol * scale
    )


def probe(size: int, seed: int = 2) -> Tensor:
    """A float64 Gaussian vector of ``size`` entries, on the CPU."""
    return torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=WIDE)


def check_operator(operator: CurvatureOperator, oracle: CurvatureOperator, device: str) -> None:
    """Products (also through ``to_scipy`` and a linear combination), damped solves, the
    diagonal, trace and dense matrix of ``operator`` (float32 on ``device``) equal the float64
    CPU ``oracle``'s."""
    vector = probe(oracle.shape[0])
    expected = oracle @ vector
    assert_near(operator @ narrow(vector, device), expected, device)
    assert_near(operator.solve(narrow(vector, device), 0.1), oracle.solve(vector, 0.1), device)
    assert_near(operator.diag(), oracle.diag(), device)
    assert_near(operator.trace(), oracle.trace(), device)
    assert_near(operator.to_dense(), oracle.to_dense(), device)
    combined = (operator + operator * 0.5) @ narrow(vector, device)
    assert_near(combined, 1.5 * expected, device)
    scipy_product = torch.from_numpy(operator.to_scipy() @ vector.numpy().astype(np.float32))
    assert_near(scipy_product, expected, "cpu")


# -- 1. curvature builders ---------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("structure", FISHER_STRUCTURES)
@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_fisher_on_device_equals_the_float64_cpu_fisher(
    device: str, net: Callable[[], nn.Module], structure: str, kind: str
) -> None:
    model = net()
    inputs, labels = batch(net)
    options = {"kind": kind, "structure": structure}
    oracle = fisher(model, inputs, "categorical", targets=labels, **options)
    operator = fisher(
        moved(model, device),
        narrow(inputs, device),
        "categorical",
        targets=labels.to(device),
        **options,
    )
    check_operator(operator, oracle, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("structure", FISHER_STRUCTURES)
def test_monte_carlo_fisher_on_device_is_reproducible_from_a_device_generator(
    device: str, net: Callable[[], nn.Module], structure: str
) -> None:
    """Same seed, same operator; another seed, another one (the draws matter)."""
    model, (inputs, _) = moved(net(), device), batch(net)
    inputs = narrow(inputs, device)

    def monte_carlo(seed: int) -> Tensor:
        generator = torch.Generator(device=device).manual_seed(seed)
        options = {"kind": "mc", "structure": structure, "mc_samples": 2, "generator": generator}
        return fisher(model, inputs, "categorical", **options).to_dense()

    first, again, other = monte_carlo(0), monte_carlo(0), monte_carlo(1)
    assert first.device.type == device
    assert bool(torch.isfinite(first).all())
    torch.testing.assert_close(again, first, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(other, first, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_monte_carlo_fisher_on_device_converges_to_the_exact_fisher(device: str) -> None:
    """With many draws the dense Monte-Carlo Fisher approaches the float64 exact one
    (tolerance: about 6 standard errors of the ``M`` draws' mean)."""
    model, (inputs, _) = mlp(), batch(mlp)
    exact = fisher(model, inputs, "categorical").to_dense()
    draws = 4000
    generator = torch.Generator(device=device).manual_seed(3)
    sampled = fisher(
        moved(model, device),
        narrow(inputs, device),
        "categorical",
        kind="mc",
        mc_samples=draws,
        generator=generator,
    ).to_dense()
    assert sampled.device.type == device
    error = (sampled.cpu().to(WIDE) - exact).abs().max()
    assert error <= 6.0 * float(exact.abs().max()) / math.sqrt(draws)


GGN_LOSSES = {
    "cross_entropy": (nn.CrossEntropyLoss(), lambda labels: labels),
    "mse": (nn.MSELoss(), lambda labels: nn.functional.one_hot(labels, 3).to(WIDE)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("structure", FISHER_STRUCTURES)
@pytest.mark.parametrize("loss", sorted(GGN_LOSSES))
def test_ggn_on_device_equals_the_float64_cpu_ggn(
    device: str, net: Callable[[], nn.Module], structure: str, loss: str
) -> None:
    model, (inputs, labels) = net(), batch(net)
    loss_fn, as_targets = GGN_LOSSES[loss]
    targets = as_targets(labels)
    oracle = ggn(model, inputs, loss_fn, targets, structure)
    operator = ggn(
        moved(model, device), narrow(inputs, device), loss_fn, narrow(targets, device), structure
    )
    check_operator(operator, oracle, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("structure", ["dense", "diag", "block", "implicit"])
def test_hessian_on_device_equals_the_float64_cpu_hessian(device: str, structure: str) -> None:
    """The Hessian of the cross-entropy (not PSD: products only, no damped solve)."""
    model, (inputs, labels) = mlp(), batch(mlp)
    loss_fn = nn.CrossEntropyLoss()
    oracle = hessian(model, inputs, loss_fn, labels, structure)
    operator = hessian(
        moved(model, device), narrow(inputs, device), loss_fn, labels.to(device), structure
    )
    vector = probe(oracle.shape[0])
    assert_near(operator @ narrow(vector, device), oracle @ vector, device)
    assert_near(operator.to_dense(), oracle.to_dense(), device)


# -- 2. K-FAC and EKFAC preconditioners --------------------------------------------------------
def train_preconditioned(
    model: nn.Module,
    precond: KFAC,
    net: Callable[[], nn.Module],
    device: str,
    dtype: torch.dtype,
    steps: int = 6,
) -> None:
    """``steps`` SGD-with-momentum steps on fresh batches of ``net``'s data and the
    cross-entropy, the gradients rewritten by ``precond`` (which samples its backward pass
    where its Fisher is not the empirical one). The batches are larger than every factor's
    dimension, so that no factor has a repeated (zero) eigenvalue: EKFAC's eigenvalue
    estimates depend on the basis chosen inside a degenerate eigenspace, which round-off
    decides."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        inputs, labels = batch(net, size=16, seed=10 + step)
        optimizer.zero_grad()
        outputs = model(inputs.to(device=device, dtype=dtype))
        if precond.fisher_type != "empirical":
            precond.sample_backward(outputs)
        nn.functional.cross_entropy(outputs, labels.to(device)).backward()
        precond.step()
        optimizer.step()


PRECONDITIONER_OPTIONS = {"factor_decay": 0.9, "inv_update_interval": 2, "damping": 0.01}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_preconditioned_steps_on_device_equal_float64_cpu_steps(
    device: str, net: Callable[[], nn.Module], cls: type[KFAC]
) -> None:
    reference, model = net(), moved(net(), device)
    train_preconditioned(reference, cls(reference, **PRECONDITIONER_OPTIONS), net, "cpu", WIDE)
    precond = cls(model, **PRECONDITIONER_OPTIONS)
    train_preconditioned(model, precond, net, device, NARROW)
    for layer in precond.layers:
        assert layer.input_factor.device.type == device
        assert layer.output_factor.device.type == device
    for actual, expected in zip(model.parameters(), reference.parameters(), strict=True):
        assert_near(actual, expected.detach(), device, rtol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_monte_carlo_preconditioner_on_device_is_reproducible_from_its_seed(
    device: str, cls: type[KFAC]
) -> None:
    def run(seed: int) -> list[Tensor]:
        model = moved(convnet(), device)
        generator = torch.Generator(device=device).manual_seed(seed)
        precond = cls(
            model,
            fisher_type="mc",
            likelihood="categorical",
            generator=generator,
            **PRECONDITIONER_OPTIONS,
        )
        train_preconditioned(model, precond, convnet, device, NARROW, steps=3)
        assert all(layer.output_factor.device.type == device for layer in precond.layers)
        return [p.detach() for p in model.parameters()]

    first, again, other = run(0), run(0), run(1)
    for actual, expected in zip(again, first, strict=True):
        assert actual.device.type == device and bool(torch.isfinite(actual).all())
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)
    assert any(
        not torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(first, other, strict=True)
    )


@CUDA_ONLY
@pytest.mark.parametrize("name", ["categorical", "gaussian", "bernoulli", "poisson"])
def test_a_cpu_generator_draws_the_cpu_targets_for_outputs_on_cuda(name: str) -> None:
    """The draws happen on the generator's device and move to the outputs': a CPU seed gives
    the same Monte-Carlo targets on every device (torch alone refuses a CPU generator for
    CUDA draws)."""
    likelihood = get_likelihood(name)
    outputs = torch.randn(64, 5, generator=torch.Generator().manual_seed(3), dtype=WIDE)
    expected = likelihood.sample(outputs, torch.Generator().manual_seed(0))
    actual = likelihood.sample(outputs.cuda(), torch.Generator().manual_seed(0))
    assert actual.device.type == "cuda"
    torch.testing.assert_close(actual.cpu(), expected, rtol=1e-12, atol=1e-12)


# -- 3. optimizers -----------------------------------------------------------------------------
def closure_for(
    model: nn.Module, optimizer: torch.optim.Optimizer, inputs: Tensor, labels: Tensor
) -> Callable[[], Tensor]:
    """Zero the gradients, compute the mean cross-entropy, back-propagate, return it."""

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        return loss

    return closure


def closure_steps(
    model: nn.Module,
    make: Callable[[nn.Module], torch.optim.Optimizer],
    device: str,
    dtype: torch.dtype,
    steps: int = 4,
) -> list[Tensor]:
    """``steps`` closure steps of the optimizer ``make(model)`` on the MLP's batches; the
    parameters after them."""
    optimizer = make(model)
    for step in range(steps):
        inputs, labels = batch(mlp, seed=20 + step)
        inputs, labels = inputs.to(device=device, dtype=dtype), labels.to(device)
        optimizer.step(closure_for(model, optimizer, inputs, labels))
    return [p.detach() for p in model.parameters()]


def check_closure_optimizer(make: Callable[[nn.Module], torch.optim.Optimizer], device: str):
    """The optimizer's steps on ``device`` in float32 equal its float64 steps on the CPU."""
    expected = closure_steps(mlp(), make, "cpu", WIDE)
    actual = closure_steps(moved(mlp(), device), make, device, NARROW)
    for param, reference in zip(actual, expected, strict=True):
        assert_near(param, reference, device, rtol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("structure", ["dense", "diag", "kfac", "implicit"])
def test_natural_gradient_on_device_equals_float64_cpu_steps(device: str, structure: str) -> None:
    def make(model: nn.Module) -> NaturalGradient:
        return NaturalGradient(model, "categorical", lr=0.5, structure=structure, damping=0.05)

    check_closure_optimizer(make, device)


@pytest.mark.parametrize("device", DEVICES)
def test_quadratic_model_optimizer_on_device_equals_float64_cpu_steps(device: str) -> None:
    def make(model: nn.Module) -> QuadraticModelOptimizer:
        return QuadraticModelOptimizer(model, "categorical", max_kl=0.05)

    check_closure_optimizer(make, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grafting", [None, "adam"])
def test_shampoo_on_device_equals_float64_cpu_steps(device: str, grafting: str | None) -> None:
    def make(model: nn.Module) -> Shampoo:
        return Shampoo(model.parameters(), lr=0.05, momentum=0.5, grafting=grafting)

    check_closure_optimizer(make, device)


def hessian_closure_steps(
    model: nn.Module, generator: torch.Generator, device: str, dtype: torch.dtype
) -> list[Tensor]:
    """Four AdaHessian steps (the loss back-propagated with ``create_graph=True``)."""
    optimizer = AdaHessian(model.parameters(), lr=0.05, generator=generator)
    for step in range(4):
        inputs, labels = batch(mlp, seed=30 + step)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(
            model(inputs.to(device=device, dtype=dtype)), labels.to(device)
        )
        loss.backward(create_graph=True)
        optimizer.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
@pytest.mark.parametrize("device", DEVICES)
def test_adahessian_with_a_cpu_generator_on_device_equals_float64_cpu_steps(device: str) -> None:
    """A CPU generator draws the same Rademacher signs for any device: the steps are the
    float64 CPU steps."""
    expected = hessian_closure_steps(mlp(), torch.Generator().manual_seed(0), "cpu", WIDE)
    actual = hessian_closure_steps(
        moved(mlp(), device), torch.Generator().manual_seed(0), device, NARROW
    )
    for param, reference in zip(actual, expected, strict=True):
        assert_near(param, reference, device, rtol=1e-3)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
@pytest.mark.parametrize("device", DEVICES)
def test_adahessian_with_a_device_generator_is_reproducible_from_its_seed(device: str) -> None:
    def run(seed: int) -> list[Tensor]:
        generator = torch.Generator(device=device).manual_seed(seed)
        return hessian_closure_steps(moved(mlp(), device), generator, device, NARROW)

    first, again, other = run(0), run(0), run(1)
    for actual, expected in zip(again, first, strict=True):
        assert actual.device.type == device and bool(torch.isfinite(actual).all())
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(first, other, strict=True))


def family_pair(name: str, dtype: torch.dtype, device: str) -> tuple[ExponentialFamily, ...]:
    """A start ``q`` and a target ``p`` of one family, batch of two, in ``dtype`` on ``device``."""

    def tensor(values: list) -> Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    if name == "gaussian":
        return Gaussian(tensor([0.3, -1.0]), tensor([1.0, 1.0])), Gaussian(
            tensor([1.0, 0.5]), tensor([0.5, 2.0])
        )
    if name == "gamma":
        return Gamma(tensor([2.0, 1.5]), tensor([1.0, 3.0])), Gamma(
            tensor([4.0, 0.8]), tensor([2.0, 1.0])
        )
    return Dirichlet(tensor([[1.0, 2.0, 3.0], [0.7, 0.7, 2.0]])), Dirichlet(
        tensor([[3.0, 1.0, 2.0], [2.0, 1.5, 0.9]])
    )


def variational_steps(name: str, device: str, dtype: torch.dtype) -> list[Tensor]:
    """Three natural-gradient steps on ``KL(q ‖ p)`` over ``q``'s natural parameters."""
    start, target = family_pair(name, dtype, device)
    theta = [t.clone().requires_grad_(True) for t in start.natural_params]
    optimizer = NaturalGradientDescent(theta, family=type(start), lr=0.5)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = type(start).from_natural(*theta).kl(target).sum()
        loss.backward()
        return loss

    for _ in range(3):
        optimizer.step(closure)
    return [t.detach() for t in theta]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["gaussian", "gamma", "dirichlet"])
def test_natural_gradient_descent_on_device_equals_float64_cpu_steps(
    device: str, name: str
) -> None:
    expected = variational_steps(name, "cpu", WIDE)
    actual = variational_steps(name, device, NARROW)
    for param, reference in zip(actual, expected, strict=True):
        assert_near(param, reference, device, rtol=1e-4)


# -- 4. linalg ---------------------------------------------------------------------------------
def spd_matrix(seed: int, size: int, rank: int | None = None) -> Tensor:
    """A float64 symmetric PSD ``size × size`` matrix ``B Bᵀ / k``, ``B`` Gaussian with
    ``k = rank or size + 2`` columns, on the CPU."""
    columns = rank or size + 2
    factor = torch.randn(size, columns, generator=torch.Generator().manual_seed(seed), dtype=WIDE)
    return factor @ factor.T / columns


SEEDS = st.integers(0, 2**16)
SIZES = st.integers(2, 7)


@pytest.mark.parametrize("device", DEVICES)
@LINALG_SETTINGS
@given(seed=SEEDS, size=SIZES)
def test_cg_and_damped_solve_on_device_equal_the_float64_solve(
    device: str, seed: int, size: int
) -> None:
    matrix, rhs = spd_matrix(seed, size), probe(size, seed)
    expected = torch.linalg.solve(matrix + 0.1 * torch.eye(size, dtype=WIDE), rhs)
    on_device = narrow(matrix, device)
    solution, info = cg(
        lambda v: on_device @ v + 0.1 * v, narrow(rhs, device), rtol=1e-6, max_iter=10 * size
    )
    assert info.converged
    assert_near(solution, expected, device, rtol=1e-3)
    assert_near(damped_solve(on_device, narrow(rhs, device), 0.1), expected, device, rtol=1e-3)
    singular = spd_matrix(seed, size, rank=1)  # damped, condition number about 100 · size
    expected = torch.linalg.solve(singular + 1e-2 * torch.eye(size, dtype=WIDE), rhs)
    actual = damped_solve(narrow(singular, device), narrow(rhs, device), 1e-2)
    assert_near(actual, expected, device, rtol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@LINALG_SETTINGS
@given(seed=SEEDS, rows=SIZES, columns=SIZES)
def test_kron_mv_on_device_equals_the_float64_kronecker_product(
    device: str, seed: int, rows: int, columns: int
) -> None:
    output_factor, input_factor = spd_matrix(seed, rows), spd_matrix(seed + 1, columns)
    matrix = probe(rows * columns, seed).reshape(rows, columns)
    expected = (torch.kron(output_factor, input_factor) @ matrix.reshape(-1)).reshape(rows, -1)
    actual = kron_mv(
        narrow(output_factor, device), narrow(input_factor, device), narrow(matrix, device)
    )
    assert_near(actual, expected, device)
    diagonal = input_factor.diagonal()
    expected = (torch.kron(output_factor, torch.diag(diagonal)) @ matrix.reshape(-1)).reshape(
        rows, -1
    )
    actual = kron_mv(
        narrow(output_factor, device), narrow(diagonal, device), narrow(matrix, device)
    )
    assert_near(actual, expected, device)


@pytest.mark.parametrize("device", DEVICES)
@LINALG_SETTINGS
@given(seed=SEEDS, size=SIZES)
def test_eigendecompositions_and_matrix_powers_on_device_equal_float64_ones(
    device: str, seed: int, size: int
) -> None:
    matrix = spd_matrix(seed, size)
    values, vectors = torch.linalg.eigh(matrix)
    eigen = symmetric_eigh(narrow(matrix, device))
    assert_near(eigen.values, values, device)
    reconstructed = eigen.vectors @ torch.diag(eigen.values) @ eigen.vectors.T
    assert_near(reconstructed, matrix, device)

    def power(exponent: float) -> Tensor:
        return vectors @ torch.diag((values + 0.1) ** exponent) @ vectors.T

    assert_near(psd_matrix_power(narrow(matrix, device), 0.5, 0.1), power(0.5), device)
    assert_near(psd_matrix_power(narrow(matrix, device), -1.5, 0.1), power(-1.5), device)
    assert_near(inverse_pth_root(narrow(matrix, device), 4, 0.1), power(-0.25), device)


# -- 5. models ---------------------------------------------------------------------------------
def lower_bound_elbo(model: PNMF, counts: np.ndarray) -> float:
    """The Jensen lower bound on the ELBO of the fitted ``model`` on its training counts, in
    NumPy float64: ``Σ y log Σ_l W_jl e^{μ_il} − Σ E[rate] − Σ log y! − KL(q ‖ N(0, 1))``."""
    loadings = model.components_.T
    mean, variance = model.variational_mean_, model.variational_variance_
    log_rates = np.log(np.exp(mean) @ loadings.T)
    rate_sum = float((np.exp(mean + 0.5 * variance) @ loadings.T).sum())
    kl = 0.5 * float((variance + mean**2 - 1.0 - np.log(variance)).sum())
    return float((counts * log_rates).sum()) - rate_sum - float(gammaln(counts + 1).sum()) - kl


def poisson_counts(samples: int = 30, features: int = 8, seed: int = 0) -> np.ndarray:
    """Counts of a rank-2 Poisson NMF model, float64."""
    rng = np.random.default_rng(seed)
    loadings = rng.gamma(1.0, 2.0, (features, 2))
    factors = rng.normal(0.0, 1.0, (samples, 2))
    return rng.poisson(np.exp(factors) @ loadings.T).astype(np.float64)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("device", DEVICES)
def test_pnmf_fit_on_device_has_the_elbo_of_its_fitted_parameters(device: str) -> None:
    """The initial draws differ between devices (their generators do), so the device's fit is
    checked against device-independent facts: its reported ELBO is the float64 NumPy lower
    bound at its fitted parameters, it improved on the start, and it ends within 1 % of the
    CPU fit's."""
    counts = poisson_counts()
    options = {"n_components": 2, "training_mode": "natural", "mode": "lower-bound"}
    fitted = PNMF(**options, max_iter=60, random_state=0, device=device).fit(counts)
    reference = PNMF(**options, max_iter=60, random_state=0, device="cpu").fit(counts)
    assert fitted.elbo_ == pytest.approx(lower_bound_elbo(fitted, counts), rel=1e-9)
    assert np.isfinite(fitted.elbo_history_).all()
    assert fitted.elbo_history_[-1] > fitted.elbo_history_[0]
    assert fitted.elbo_ == pytest.approx(reference.elbo_, rel=1e-2)
    activations = fitted.transform(counts)
    assert activations.shape == (30, 2) and np.isfinite(activations).all()


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("device", DEVICES)
def test_pnmf_monte_carlo_fit_on_device_is_reproducible(device: str) -> None:
    counts = poisson_counts(seed=1).astype(np.float32)
    options = {"n_components": 2, "mode": "expanded", "E": 3, "max_iter": 15, "device": device}
    first = PNMF(**options, random_state=0).fit(counts)
    again = PNMF(**options, random_state=0).fit(counts)
    np.testing.assert_allclose(again.elbo_history_, first.elbo_history_, rtol=1e-6)
    np.testing.assert_allclose(again.components_, first.components_, rtol=1e-5)
    assert np.isfinite(first.elbo_history_).all() and np.isfinite(first.elbo_)


# -- 6. exponential families -------------------------------------------------------------------
def family_instances(name: str, dtype: torch.dtype, device: str) -> tuple[ExponentialFamily, ...]:
    """Two distributions ``p``, ``q`` of one family, batch of two, in ``dtype`` on ``device``."""

    def tensor(values: list) -> Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    if name in ("gaussian", "gamma", "dirichlet"):
        return family_pair(name, dtype, device)
    if name == "multivariate_gaussian":
        scale = tensor([[[1.0, 0.0], [0.3, 0.8]], [[0.5, 0.0], [-0.2, 1.2]]])
        jitter = 0.2 * torch.eye(2, dtype=dtype, device=device)
        return (
            MultivariateGaussian(tensor([[0.1, -0.4], [1.0, 0.0]]), scale @ scale.mT),
            MultivariateGaussian(tensor([[0.5, 0.2], [0.0, 1.0]]), scale.mT @ scale + jitter),
        )
    if name == "bernoulli":
        return Bernoulli(logits=tensor([0.3, -1.2])), Bernoulli(logits=tensor([1.0, 0.4]))
    if name == "categorical":
        return (
            Categorical(logits=tensor([[0.1, 1.0, -0.5], [2.0, 0.0, 0.3]])),
            Categorical(logits=tensor([[0.5, 0.0, 0.5], [-1.0, 0.2, 0.1]])),
        )
    if name == "poisson":
        return Poisson(tensor([2.5, 7.0])), Poisson(tensor([4.0, 1.5]))
    return Beta(tensor([2.0, 0.8]), tensor([3.0, 1.5])), Beta(
        tensor([1.2, 2.0]), tensor([0.9, 4.0])
    )


FAMILIES = [
    "bernoulli",
    "beta",
    "categorical",
    "dirichlet",
    "gamma",
    "gaussian",
    "multivariate_gaussian",
    "poisson",
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", FAMILIES)
def test_exponential_family_on_device_equals_float64_cpu_values(device: str, name: str) -> None:
    """``kl``, ``entropy``, ``log_prob`` at samples, ``fisher``, ``natural_params``,
    ``mean_params`` and the inversion mean → natural (Newton's method for Gamma, Beta and
    Dirichlet)."""
    p, q = family_instances(name, WIDE, "cpu")
    p_device, q_device = family_instances(name, NARROW, device)
    torch.manual_seed(4)
    x = p.to_torch().sample(torch.Size([3]))
    assert_near(p_device.kl(q_device), p.kl(q), device)
    assert_near(p_device.entropy(), p.entropy(), device)
    assert_near(p_device.log_prob(narrow(x, device)), p.log_prob(x), device)
    assert_near(p_device.fisher(), p.fisher(), device)
    for actual, expected in zip(p_device.natural_params, p.natural_params, strict=True):
        assert_near(actual, expected, device)
    for actual, expected in zip(p_device.mean_params, p.mean_params, strict=True):
        assert_near(actual, expected, device)
    inverted = type(p_device).from_mean(*p_device.mean_params)
    for actual, expected in zip(inverted.natural_params, p.natural_params, strict=True):
        assert_near(actual, expected, device, rtol=2e-3)


# -- 7. evolution strategies -------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("objective", [sphere, ellipsoid, rosenbrock])
def test_test_functions_on_device_equal_float64_cpu_values(
    device: str, objective: Callable[[Tensor], Tensor]
) -> None:
    points = torch.randn(5, 4, generator=torch.Generator().manual_seed(5), dtype=WIDE)
    assert_near(objective(narrow(points, device)), objective(points), device)


@CUDA_ONLY
@pytest.mark.parametrize("cls", [SNES, XNES])
def test_evolution_strategy_refuses_a_start_point_or_generator_off_the_cpu(
    cls: type[SNES],
) -> None:
    """The strategies sample and update their distribution on the CPU (they have no device
    option): a CUDA ``x0`` or generator is refused, naming its device, rather than failing
    later with a device mismatch inside ``ask``."""
    with pytest.raises(ValueError, match="cuda"):
        cls(torch.zeros(3, device="cuda"), 1.0, random_state=0)
    with pytest.raises(ValueError, match="cuda"):
        cls([0.0, 0.0, 0.0], 1.0, random_state=torch.Generator(device="cuda"))


# -- 9. torch.distributed ----------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_one_process_group_on_device_leaves_kfac_and_the_reductions_unchanged(
    device: str, tmp_path: Path
) -> None:
    """A world of one process (NCCL on CUDA, gloo on the CPU): K-FAC on a
    DistributedDataParallel model takes the steps of the bare model, and the reductions are
    identities on device tensors. (natgrad's collectives are skipped in a world of one: the
    NCCL paths of several processes need several GPUs.)"""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    reference = moved(convnet(), device)
    reference_precond = KFAC(reference, **PRECONDITIONER_OPTIONS)
    train_preconditioned(reference, reference_precond, convnet, device, NARROW)
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=(tmp_path / "rendezvous").as_uri(), rank=0, world_size=1
    )
    try:
        wrapped = DistributedDataParallel(moved(convnet(), device))
        precond = KFAC(wrapped, **PRECONDITIONER_OPTIONS)
        train_preconditioned(wrapped, precond, convnet, device, NARROW)
        for actual, expected in zip(wrapped.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)
        values = torch.arange(4.0, device=device)
        ngdist.all_reduce_sum_([values])
        ngdist.broadcast_from_([values], 0)
        (mean,) = ngdist.mean_over_processes([values.sum()])
        assert values.device.type == device and mean.device.type == device
        assert values.tolist() == [0.0, 1.0, 2.0, 3.0] and float(mean) == 6.0
        assert (ngdist.world_size(), ngdist.rank(), ngdist.true_everywhere(True)) == (1, 0, True)
    finally:
        dist.destroy_process_group()
