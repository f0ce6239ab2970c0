"""A loaded NES state must describe a valid search distribution and a consistent pending ask.

Invalid values (a step size that is not positive, a singular xNES shape matrix, pending samples
that are not those of the saved noise, counters that are not integers) are refused with an
error naming the key and the value, before anything changes. Valid ones, also from long
ill-conditioned runs in float32, load.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from natgrad.es import SNES, XNES, ellipsoid

STRATEGIES = {"xnes": XNES, "snes": SNES}


def run(strategy, generations, objective=ellipsoid):
    for _ in range(generations):
        samples = strategy.ask()
        strategy.tell(samples, objective(samples.double()))
    return strategy


def started(method, dtype=torch.float64, pending=True):
    strategy = run(STRATEGIES[method]([1.0, -2.0, 0.5], 0.7, random_state=3, dtype=dtype), 3)
    if pending:
        strategy.ask()
    return strategy


def assert_refused_unchanged(target, state, error, *fragments):
    before = target.state_dict()
    with pytest.raises(error) as caught:
        target.load_state_dict(state)
    for fragment in fragments:
        assert fragment in str(caught.value)
    after = target.state_dict()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(after[key], value), key
        else:
            assert after[key] == value, key


@pytest.mark.parametrize("entries", [[0.0, 0.5, 0.5], [0.5, -0.1, 0.5], [-1.0, -1.0, -1.0]])
def test_a_snes_sigma_that_is_not_positive_is_refused(entries):
    state = started("snes", pending=False).state_dict()
    state["sigma"] = torch.tensor(entries, dtype=torch.float64)
    bad = str([i for i, v in enumerate(entries) if v <= 0])[1:-1]
    target = SNES([0.0, 0.0, 0.0], random_state=1)
    assert_refused_unchanged(target, state, ValueError, "state_dict['sigma']", "positive", bad)


@pytest.mark.parametrize(
    "shape",
    [
        torch.zeros(3, 3, dtype=torch.float64),
        torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64),
        torch.diag(torch.tensor([1e9, 1.0, 1e-9], dtype=torch.float64)),  # condition 1e18
    ],
)
def test_a_singular_xnes_shape_is_refused(shape):
    state = started("xnes", pending=False).state_dict()
    state["shape"] = shape
    target = XNES([0.0, 0.0, 0.0], random_state=1)
    assert_refused_unchanged(target, state, ValueError, "state_dict['shape']", "invertible")


@pytest.mark.parametrize("method", ["xnes", "snes"])
def test_pending_samples_that_are_not_those_of_the_saved_noise_are_refused(method):
    state = started(method).state_dict()
    state["asked_noise"] = state["asked_noise"].flip(0)
    target = STRATEGIES[method]([0.0, 0.0, 0.0], random_state=1)
    assert_refused_unchanged(target, state, ValueError, "asked_samples", "asked_noise")


@pytest.mark.parametrize("method", ["xnes", "snes"])
@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        ("generation", True, TypeError),
        ("generation", 2.0, TypeError),
        ("dim", True, TypeError),
        ("population_size", 7.0, TypeError),
        ("mean", torch.tensor([0.0, float("inf"), 0.0], dtype=torch.float64), ValueError),
    ],
)
def test_counters_of_the_wrong_type_and_non_finite_tensors_are_named(method, key, value, error):
    state = started(method).state_dict()
    state[key] = value
    target = STRATEGIES[method]([0.0, 0.0, 0.0], random_state=1)
    assert_refused_unchanged(target, state, error, f"state_dict[{key!r}]", repr(value))


@settings(max_examples=20, deadline=None)
@given(scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_only_the_product_sigma_shape_matters_for_a_loaded_xnes(scale, seed):
    """A shape of determinant other than 1 is a valid factor: ``σ/c`` with ``c B`` is the same
    distribution (same covariance, same next samples up to rounding); it loads."""
    reference = run(XNES([1.0, -2.0, 0.5], 0.7, random_state=seed), 4)
    state = reference.state_dict()
    state["sigma"] = reference.sigma / scale
    state["shape"] = reference.shape * scale
    loaded = XNES([0.0, 0.0, 0.0], random_state=1)
    loaded.load_state_dict(state)
    torch.testing.assert_close(loaded.covariance, reference.covariance, rtol=1e-12, atol=0)
    torch.testing.assert_close(loaded.ask(), reference.ask(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["xnes", "snes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_states_of_long_ill_conditioned_runs_load(method, dtype):
    strategy = STRATEGIES[method]([1.0, -2.0, 0.5, 3.0], 1.0, random_state=0, dtype=dtype)
    run(strategy, 400, lambda x: ellipsoid(x, condition=1e8))
    strategy.ask()
    twin = STRATEGIES[method]([0.0] * 4, random_state=1, dtype=dtype)
    twin.load_state_dict(strategy.state_dict())
    assert torch.equal(twin.ask(), strategy.ask())
