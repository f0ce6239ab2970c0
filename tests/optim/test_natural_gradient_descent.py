"""NaturalGradientDescent: dense-Fisher oracle, conjugate posteriors, domain safety, state."""

from __future__ import annotations

import io
import math
import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
from natgrad.optim import NaturalGradientDescent

DTYPE = torch.float64
SETTINGS = settings(max_examples=5, deadline=None)
SMALL_LR = 2.0**-16  # a power of two: (θ − θ')/lr has the rounding error of one subtraction


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=DTYPE)


def _floats(low: float, high: float, count: int) -> st.SearchStrategy[list[float]]:
    element = st.floats(low, high, allow_nan=False, allow_infinity=False)
    return st.lists(element, min_size=count, max_size=count)


def _spd(entries: list[float]) -> torch.Tensor:
    factor = _t(entries).reshape(2, 3, 3)
    return factor @ factor.mT + 0.5 * torch.eye(3, dtype=DTYPE)


# Batch of two distributions per family, built from usual parameters drawn by hypothesis.
FAMILIES = {
    "gaussian": (
        st.tuples(_floats(-3, 3, 2), _floats(0.3, 3, 2)),
        lambda p: Gaussian(_t(p[0]), _t(p[1])),
    ),
    "multivariate_gaussian": (
        st.tuples(_floats(-2, 2, 6), _floats(-1, 1, 18)),
        lambda p: MultivariateGaussian(_t(p[0]).reshape(2, 3), _spd(p[1])),
    ),
    "bernoulli": (st.tuples(_floats(-4, 4, 2)), lambda p: Bernoulli(logits=_t(p[0]))),
    "categorical": (
        st.tuples(_floats(-3, 3, 8)),
        lambda p: Categorical(logits=_t(p[0]).reshape(2, 4)),
    ),
    "poisson": (st.tuples(_floats(0.2, 20, 2)), lambda p: Poisson(_t(p[0]))),
    "gamma": (
        st.tuples(_floats(0.5, 10, 2), _floats(0.5, 5, 2)),
        lambda p: Gamma(_t(p[0]), _t(p[1])),
    ),
    "beta": (st.tuples(_floats(0.5, 10, 2), _floats(0.5, 10, 2)), lambda p: Beta(*map(_t, p))),
    "dirichlet": (
        st.tuples(_floats(0.5, 10, 8)),
        lambda p: Dirichlet(_t(p[0]).reshape(2, 4)),
    ),
}


def _leaves(q: ExponentialFamily) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in q.natural_params]


def _smooth_loss(q: ExponentialFamily, theta, weights: torch.Tensor) -> torch.Tensor:
    """Σ w₁ θ² + Σ w₂ η(θ) over the flattened parameters (θ₂ of the MVN used as is)."""
    point = type(q).from_natural(*theta, validate=False)
    flat_theta = q.flatten_params(theta)
    flat_eta = q.flatten_params(point.mean_params)
    return (weights[0] * flat_theta.square()).sum() + (weights[1] * flat_eta).sum()


def _reduced_basis(q: ExponentialFamily) -> torch.Tensor:
    """Columns spanning the flattened parameters; for the MVN, θ₂ is restricted to symmetric
    matrices through the duplication matrix (its Fisher is singular on antisymmetric ones)."""
    if not isinstance(q, MultivariateGaussian):
        return torch.eye(q.natural_dim, dtype=DTYPE)
    dim = q.dim
    pairs = [(i, j) for i in range(dim) for j in range(i, dim)]
    duplication = torch.zeros(dim * dim, len(pairs), dtype=DTYPE)
    for column, (i, j) in enumerate(pairs):
        duplication[i * dim + j, column] = 1.0
        duplication[j * dim + i, column] = 1.0
    return torch.block_diag(torch.eye(dim, dtype=DTYPE), duplication)


def _dense_natural_gradient(q: ExponentialFamily, gradient: torch.Tensor) -> torch.Tensor:
    """Test oracle: ``B (Bᵀ F B)⁻¹ Bᵀ g`` by ``torch.linalg.solve`` with the dense Fisher."""
    basis = _reduced_basis(q)
    fisher = basis.T @ q.fisher() @ basis
    solution = torch.linalg.solve(fisher, (gradient @ basis).unsqueeze(-1)).squeeze(-1)
    return solution @ basis.T


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_step_direction_equals_dense_fisher_solve(name: str) -> None:
    strategy, build = FAMILIES[name]

    @SETTINGS
    @given(strategy, st.integers(0, 2**16))
    def check(usual, seed) -> None:
        q = build(usual)
        generator = torch.Generator().manual_seed(seed)
        weights = torch.randn(2, *q.batch_shape, q.natural_dim, generator=generator, dtype=DTYPE)
        theta = _leaves(q)
        _smooth_loss(q, theta, weights).backward()
        gradient = q.flatten_params([t.grad for t in theta])
        optimizer = NaturalGradientDescent(theta, family=type(q), lr=SMALL_LR)
        optimizer.step()
        assert optimizer.counters["domain_halvings"] == 0
        moved = (q.flatten_params(q.natural_params) - q.flatten_params(theta).detach()) / SMALL_LR
        expected = _dense_natural_gradient(q, gradient)
        scale = 1.0 + expected.abs().max()
        torch.testing.assert_close(moved, expected, rtol=1e-8, atol=1e-8 * scale)
        if isinstance(q, MultivariateGaussian):
            torch.testing.assert_close(theta[1], theta[1].mT, rtol=0, atol=0)

    check()


# -- conjugate models: one step with lr = 1 lands on the exact posterior ----------------------
DATA = _t([0.3, -1.2, 2.1, 0.8, 1.7])
NOISE_VARIANCE = 0.7
PRIOR_LOC, PRIOR_VARIANCE = 0.5, 2.0


def _gaussian_negative_elbo(theta1: torch.Tensor, theta2: torch.Tensor) -> torch.Tensor:
    """−ELBO of q(μ) = N(m, v) for x_i ~ N(μ, σ²), μ ~ N(m₀, s₀²), written out by hand."""
    m, v = -theta1 / (2 * theta2), -1 / (2 * theta2)
    squared_error = (DATA - m.unsqueeze(-1)).square().sum(-1) + DATA.numel() * v
    expected_nll = squared_error / (2 * NOISE_VARIANCE)
    kl = 0.5 * (math.log(PRIOR_VARIANCE) - torch.log(v)) - 0.5
    kl = kl + (v + (m - PRIOR_LOC) ** 2) / (2 * PRIOR_VARIANCE)
    return (expected_nll + kl).sum()


def _gaussian_posterior() -> tuple[float, float]:
    precision = 1 / PRIOR_VARIANCE + DATA.numel() / NOISE_VARIANCE
    precision_times_mean = PRIOR_LOC / PRIOR_VARIANCE + float(DATA.sum()) / NOISE_VARIANCE
    return precision_times_mean, -0.5 * precision


def _optimizer(q: ExponentialFamily, negative_elbo, lr: float, **kwargs):
    """Leaves of ``q``'s natural parameters, NaturalGradientDescent over them and a closure
    returning ``negative_elbo(*theta)``."""
    theta = _leaves(q)
    optimizer = NaturalGradientDescent(theta, family=type(q), lr=lr, **kwargs)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = negative_elbo(*theta)
        loss.backward()
        return loss

    return theta, optimizer, closure


def _gaussian_optimizer(loc: float, scale: float, lr: float, **kwargs):
    return _optimizer(Gaussian(_t(loc), _t(scale)), _gaussian_negative_elbo, lr, **kwargs)


@SETTINGS
@given(st.floats(-5, 5), st.floats(0.05, 10))
def test_gaussian_conjugate_step_reaches_posterior(loc: float, scale: float) -> None:
    theta, optimizer, closure = _gaussian_optimizer(loc, scale, lr=1.0)
    start = [float(value.detach()) for value in theta]
    loss = optimizer.step(closure)
    assert loss is not None and loss.isfinite()
    expected = _gaussian_posterior()
    for value, target, origin in zip(theta, expected, start, strict=True):
        # The step cancels θ₀ (up to 1600 at scale 0.05) down to the posterior's ~5: its
        # rounding is relative to |θ₀|, so the bound grows with it beyond |θ₀| = 10.
        atol = max(1e-10, 1e-11 * abs(origin))
        torch.testing.assert_close(value.detach(), _t(target), rtol=1e-10, atol=atol)


PRIOR_A, PRIOR_B = 2.0, 3.0
FLIPS = _t([1, 0, 1, 1, 0, 1, 1])


BETA_RTOL = 1e-8
"""The Beta steps' tolerance: the gradient of :func:`_beta_negative_elbo` goes through the
derivative of ``torch.digamma``, ``torch.polygamma(1, ·)``, accurate to about 5e-10 relative
(the Fisher of :class:`~natgrad.expfam.Beta` uses an accurate trigamma)."""


def _beta_negative_elbo(theta1: torch.Tensor, theta2: torch.Tensor) -> torch.Tensor:
    """−ELBO of q(p) = Beta(α, β) for Bernoulli flips, prior Beta(a, b), via digamma."""
    alpha, beta = theta1 + 1, theta2 + 1
    log_p = torch.digamma(alpha) - torch.digamma(alpha + beta)
    log_1mp = torch.digamma(beta) - torch.digamma(alpha + beta)
    successes, count = FLIPS.sum(), FLIPS.numel()
    expected_log_joint = (successes + PRIOR_A - 1) * log_p + (count - successes + PRIOR_B - 1) * (
        log_1mp
    )
    log_beta_fn = torch.lgamma(alpha) + torch.lgamma(beta) - torch.lgamma(alpha + beta)
    entropy = log_beta_fn - (alpha - 1) * torch.digamma(alpha) - (beta - 1) * torch.digamma(beta)
    entropy = entropy + (alpha + beta - 2) * torch.digamma(alpha + beta)
    return (-expected_log_joint - entropy).sum()


def _beta_posterior() -> tuple[float, float]:
    successes, count = float(FLIPS.sum()), FLIPS.numel()
    return PRIOR_A + successes - 1, PRIOR_B + count - successes - 1


def _beta_optimizer(a: float, b: float, lr: float):
    return _optimizer(Beta(_t(a), _t(b)), _beta_negative_elbo, lr)


@SETTINGS
@given(st.floats(0.3, 30), st.floats(0.3, 30))
def test_beta_bernoulli_conjugate_step_reaches_posterior(a: float, b: float) -> None:
    theta, optimizer, closure = _beta_optimizer(a, b, lr=1.0)
    optimizer.step(closure)
    for value, target in zip(theta, _beta_posterior(), strict=True):
        torch.testing.assert_close(value.detach(), _t(target), rtol=BETA_RTOL, atol=1e-10)


# -- domain backtracking and refused steps -----------------------------------------------------
def test_huge_step_is_halved_into_the_domain() -> None:
    """From a precision above the posterior's, lr = 1000 would make θ₂ positive."""
    lr = 1000.0
    theta, optimizer, closure = _gaussian_optimizer(1.0, 0.1, lr=lr)
    start = torch.stack([t.detach().clone() for t in theta])
    direction = start - _t(_gaussian_posterior())  # the natural gradient of this −ELBO
    halvings = next(k for k in range(30) if (start - lr * 2.0**-k * direction)[1] < 0)
    assert halvings > 0
    optimizer.step(closure)
    assert optimizer.counters["domain_halvings"] == halvings
    assert optimizer.counters["refused_steps"] == 0
    expected = start - lr * 2.0**-halvings * direction
    torch.testing.assert_close(torch.stack([t.detach() for t in theta]), expected)
    assert Gaussian._natural_in_domain(*theta).all()


def test_step_outside_the_domain_after_all_halvings_is_refused() -> None:
    theta, optimizer, closure = _gaussian_optimizer(1.0, 0.1, lr=1000.0, max_halvings=2)
    start = [t.detach().clone() for t in theta]
    with pytest.warns(RuntimeWarning, match="no step inside the natural parameter space"):
        optimizer.step(closure)
    assert optimizer.counters == {"steps": 1, "domain_halvings": 2, "refused_steps": 1}
    for value, before in zip(theta, start, strict=True):
        assert torch.equal(value.detach(), before)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_gradient_is_refused(bad: float) -> None:
    theta, optimizer, closure = _gaussian_optimizer(1.0, 0.5, lr=0.1)
    start = [t.detach().clone() for t in theta]

    def poisoned() -> torch.Tensor:
        loss = closure()
        theta[0].grad[()] = bad
        return loss

    with pytest.warns(RuntimeWarning, match="gradient is not finite"):
        optimizer.step(poisoned)
    assert optimizer.counters["refused_steps"] == 1
    for value, before in zip(theta, start, strict=True):
        assert torch.equal(value.detach(), before)


def test_failed_fisher_solve_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``LinAlgError`` from the mean-to-natural map (its Cholesky or ``F``-solve) refuses the
    step: warning, counter, parameters untouched."""
    theta, optimizer, closure = _gaussian_optimizer(1.0, 0.5, lr=0.1)
    start = [t.detach().clone() for t in theta]

    def singular(*args, **kwargs):
        raise torch.linalg.LinAlgError("the factorization could not be completed")

    monkeypatch.setattr(Gaussian, "_natural_from_mean_at", singular)
    with pytest.warns(RuntimeWarning, match="the Fisher solve failed"):
        optimizer.step(closure)
    assert optimizer.counters == {"steps": 1, "domain_halvings": 0, "refused_steps": 1}
    for value, before in zip(theta, start, strict=True):
        assert torch.equal(value.detach(), before)


def test_parameter_without_grad_counts_as_zero_gradient() -> None:
    """Only θ₁ has a gradient: the step is F⁻¹(g₁, 0) from the dense Fisher."""
    q = Gaussian(_t([0.4, -1.0]), _t([0.8, 1.5]))
    theta = _leaves(q)
    optimizer = NaturalGradientDescent(theta, family=Gaussian, lr=SMALL_LR)
    (theta[0] ** 3).sum().backward()
    theta[1].grad = None
    optimizer.step()
    gradient = q.flatten_params((3 * q.natural_params[0] ** 2, torch.zeros(2, dtype=DTYPE)))
    expected = _dense_natural_gradient(q, gradient)
    moved = (q.flatten_params(q.natural_params) - q.flatten_params(theta).detach()) / SMALL_LR
    torch.testing.assert_close(moved, expected, rtol=1e-8, atol=1e-8)


# -- state_dict, schedulers, groups ------------------------------------------------------------
def test_state_dict_round_trip_gives_the_identical_next_step() -> None:
    theta, optimizer, closure = _gaussian_optimizer(1.0, 0.1, lr=1000.0)
    optimizer.step(closure)  # halves, so the counters are non-zero
    optimizer.param_groups[0]["lr"] = 0.3
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    twin_theta, twin, twin_closure = _gaussian_optimizer(0.0, 1.0, lr=0.01)
    with torch.no_grad():
        for mine, theirs in zip(twin_theta, theta, strict=True):
            mine.copy_(theirs)
    twin.load_state_dict(saved)
    assert twin.counters == optimizer.counters
    assert twin.param_groups[0]["lr"] == 0.3 and twin.param_groups[0]["family"] is Gaussian
    optimizer.step(closure)
    twin.step(twin_closure)
    for mine, theirs in zip(twin_theta, theta, strict=True):
        assert torch.equal(mine, theirs)
    assert twin.state_dict() == optimizer.state_dict()


def test_load_state_dict_of_another_family_is_refused() -> None:
    _, gaussian_optimizer, _ = _gaussian_optimizer(1.0, 1.0, lr=0.1)
    _, beta_optimizer, _ = _beta_optimizer(1.0, 1.0, lr=0.1)
    with pytest.raises(ValueError, match=re.escape("natgrad.expfam.beta.Beta")):
        gaussian_optimizer.load_state_dict(beta_optimizer.state_dict())
    state = gaussian_optimizer.state_dict()
    del state["counters"]
    with pytest.raises(ValueError, match="counters"):
        gaussian_optimizer.load_state_dict(state)


def test_step_lr_scheduler_sets_the_step_size() -> None:
    """After StepLR halves lr to 0.5, the step goes half way to the posterior."""
    theta, optimizer, closure = _gaussian_optimizer(1.0, 2.0, lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    optimizer.step(closure)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.5
    with torch.no_grad():
        theta[0].add_(0.7)
        theta[1].sub_(0.4)
    start = torch.stack([t.detach().clone() for t in theta])
    optimizer.step(closure)
    posterior = _t(_gaussian_posterior())
    torch.testing.assert_close(
        torch.stack([t.detach() for t in theta]), 0.5 * (start + posterior), rtol=1e-10, atol=1e-10
    )


def test_two_groups_with_different_families_and_lrs() -> None:
    gaussian = _leaves(Gaussian(_t(-0.5), _t(0.3)))
    beta = _leaves(Beta(_t(4.0), _t(0.7)))
    optimizer = NaturalGradientDescent(
        [{"params": gaussian, "family": Gaussian}, {"params": beta, "family": Beta, "lr": 0.25}],
        lr=1.0,
    )
    beta_start = torch.stack([t.detach().clone() for t in beta])
    (_gaussian_negative_elbo(*gaussian) + _beta_negative_elbo(*beta)).backward()
    optimizer.step()
    torch.testing.assert_close(
        torch.stack([t.detach() for t in gaussian]), _t(_gaussian_posterior()), rtol=1e-10, atol=0
    )
    expected_beta = beta_start - 0.25 * (beta_start - _t(_beta_posterior()))
    torch.testing.assert_close(
        torch.stack([t.detach() for t in beta]), expected_beta, rtol=BETA_RTOL, atol=1e-12
    )


def test_batched_group_converges_per_distribution() -> None:
    """Three independent Gaussian posteriors in one batched group, each reached in one step."""
    theta = _leaves(Gaussian(_t([0.0, 2.0, -1.0]), _t([1.0, 0.2, 5.0])))
    optimizer = NaturalGradientDescent(theta, family=Gaussian, lr=1.0)
    _gaussian_negative_elbo(*theta).backward()
    optimizer.step()
    expected = _t(_gaussian_posterior())
    for value, target in zip(theta, expected, strict=True):
        torch.testing.assert_close(value.detach(), target.expand(3), rtol=1e-10, atol=1e-10)


# -- bad input ---------------------------------------------------------------------------------
def test_bad_inputs_raise() -> None:
    theta = _leaves(Gaussian(_t(0.0), _t(1.0)))
    with pytest.raises(
        TypeError, match=re.escape("got <class 'torch.distributions.normal.Normal'>")
    ):
        NaturalGradientDescent(theta, family=torch.distributions.Normal)
    with pytest.raises(TypeError, match="got None"):
        NaturalGradientDescent(theta)
    with pytest.raises(ValueError, match=r"Beta has 2 natural parameter\(s\) \(theta1, theta2\)"):
        NaturalGradientDescent(theta[:1], family=Beta)
    with pytest.raises(ValueError, match=r"Poisson has 1 natural parameter\(s\) \(theta\)"):
        NaturalGradientDescent(theta, family=Poisson)
    for lr in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=re.escape(f"got {lr!r}")):
            NaturalGradientDescent(theta, family=Gaussian, lr=lr)
    with pytest.raises(ValueError, match=re.escape("got -0.5")):
        NaturalGradientDescent([{"params": theta, "lr": -0.5}], family=Gaussian)
    with pytest.raises(ValueError, match="max_halvings must be a non-negative integer, got -1"):
        NaturalGradientDescent(theta, family=Gaussian, max_halvings=-1)
    mismatched = [torch.zeros(3, dtype=DTYPE, requires_grad=True), theta[1]]
    with pytest.raises(ValueError, match=r"theta1: \(3,\)"):
        NaturalGradientDescent(mismatched, family=Gaussian)
    integer = [torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)]
    with pytest.raises(TypeError, match=re.escape("torch.int64")):
        NaturalGradientDescent(integer, family=Gaussian)


def test_starting_point_outside_the_domain_is_named_and_nothing_moves() -> None:
    valid = _leaves(Gaussian(_t(0.0), _t(1.0)))
    invalid = [_t(0.0).requires_grad_(True), _t(0.5).requires_grad_(True)]
    optimizer = NaturalGradientDescent(
        [{"params": valid}, {"params": invalid}], family=Gaussian, lr=0.1
    )
    (valid[0] + valid[1] + invalid[0] + invalid[1]).backward()
    start = [t.detach().clone() for t in valid]
    with pytest.raises(ValueError, match=r"theta2 < 0.*theta2 = 0\.5"), warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()
    for value, before in zip(valid, start, strict=True):
        assert torch.equal(value.detach(), before)


def test_overflowing_direction_is_refused() -> None:
    """A finite gradient of 1e308 times F⁻¹ (entries ~ 1/variance = 100) overflows."""
    theta = _leaves(Gaussian(_t(0.0), _t(0.1)))
    optimizer = NaturalGradientDescent(theta, family=Gaussian, lr=1e-300)
    start = [t.detach().clone() for t in theta]
    theta[0].grad, theta[1].grad = _t(1e308), _t(0.0)
    with pytest.warns(RuntimeWarning, match="direction is not finite"):
        optimizer.step()
    assert optimizer.counters["refused_steps"] == 1
    for value, before in zip(theta, start, strict=True):
        assert torch.equal(value.detach(), before)


# -- a batched group steps as its distributions would in groups of their own --------------------
def _wide_and_narrow(lr: float, split: bool, **kwargs):
    """Gaussians ``N(0, 2²)`` and ``N(0, 0.1²)`` against the conjugate −ELBO, whose natural
    gradient is ``θ − θ*``: in one batched group, or in one group each."""
    start = Gaussian(_t([0.0, 0.0]), _t([2.0, 0.1]))
    if split:
        theta = [
            [t[i].detach().clone().requires_grad_(True) for t in start.natural_params]
            for i in range(2)
        ]
        groups = [{"params": pair} for pair in theta]
    else:
        theta = [_leaves(start)]
        groups = [{"params": theta[0]}]
    optimizer = NaturalGradientDescent(groups, family=Gaussian, lr=lr, **kwargs)
    loss = sum(_gaussian_negative_elbo(*pair) for pair in theta)
    loss.backward()
    return theta, optimizer


def _natural(theta: list[list[torch.Tensor]]) -> torch.Tensor:
    """(2 distributions, θ₁ θ₂) from either layout of :func:`_wide_and_narrow`."""
    return torch.cat([torch.stack(pair, -1).detach().reshape(-1, 2) for pair in theta])


@pytest.mark.parametrize("split", [False, True])
def test_only_the_distribution_that_leaves_the_domain_is_halved(split: bool) -> None:
    """lr = 1.9: the narrow one's θ₂ = −50 would become positive (halved once, to lr 0.95);
    the wide one takes the full step. Before, the batched group halved both."""
    theta, optimizer = _wide_and_narrow(1.9, split)
    start = _natural(theta)
    optimizer.step()
    sizes = _t([[1.9], [0.95]])
    expected = start - sizes * (start - _t(_gaussian_posterior()))
    torch.testing.assert_close(_natural(theta), expected, rtol=1e-14, atol=0)
    assert optimizer.counters == {"steps": 1, "domain_halvings": 1, "refused_steps": 0}


def test_a_distribution_without_a_step_in_the_domain_alone_is_held() -> None:
    theta, optimizer = _wide_and_narrow(1.9, split=False, max_halvings=0)
    start = _natural(theta)
    with pytest.warns(RuntimeWarning, match="for 1 of its 2 distributions; those 1 of its 2"):
        optimizer.step()
    after = _natural(theta)
    assert torch.equal(after[1], start[1])
    expected = start[0] - 1.9 * (start[0] - _t(_gaussian_posterior()))
    torch.testing.assert_close(after[0], expected, rtol=1e-14, atol=0)
    assert optimizer.counters == {"steps": 1, "domain_halvings": 0, "refused_steps": 1}


@SETTINGS
@given(lr=st.floats(0.1, 40.0), scales=_floats(0.02, 5.0, 3), halvings=st.integers(0, 6))
def test_batched_and_split_groups_take_the_same_steps(
    lr: float, scales: list[float], halvings: int
) -> None:
    """Oracle: one group per distribution (the same problem written two ways)."""
    batched = _leaves(Gaussian(_t([0.0, 1.0, -1.0]), _t(scales)))
    singles = [[t[i].detach().clone().requires_grad_(True) for t in batched] for i in range(3)]
    options = {"family": Gaussian, "lr": lr, "max_halvings": halvings}
    one = NaturalGradientDescent(batched, **options)
    each = NaturalGradientDescent([{"params": pair} for pair in singles], **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for optimizer, pairs in ((one, [batched]), (each, singles)):
            for _ in range(3):
                optimizer.zero_grad()
                sum(_gaussian_negative_elbo(*pair) for pair in pairs).backward()
                optimizer.step()
    for index, pair in enumerate(singles):
        for value, single in zip(batched, pair, strict=True):
            assert torch.equal(value.detach()[index], single.detach())
    assert one.counters["domain_halvings"] == each.counters["domain_halvings"]
