"""xNES/SNES ``state_dict``: a run saved, loaded into a fresh strategy and resumed is the run."""

from __future__ import annotations

import io
import math

import pytest
import torch

from natgrad.es import SNES, XNES, rosenbrock

GENERATIONS = 6
STRATEGIES = {"xnes": XNES, "snes": SNES}


def _build(method: str, dtype: torch.dtype, **changes) -> XNES | SNES:
    """The reference strategy; ``changes`` give a fresh one other initial values."""
    options = {"x0": [-1.5, 2.0, 0.5], "sigma0": 0.7, "random_state": 3, "dtype": dtype}
    options["population_size"] = 7
    options.update(changes)
    return STRATEGIES[method](**options)


def _fresh(method: str, dtype: torch.dtype) -> XNES | SNES:
    """Same class, dim, population size and dtype; every other initial value differs."""
    rates = {"eta_mean": 0.3, "eta_sigma": 0.05}
    if method == "xnes":
        rates["eta_shape"] = 0.01
    return _build(method, dtype, x0=[9.0, -9.0, 4.0], sigma0=3.0, random_state=99, **rates)


def _values(samples: torch.Tensor) -> torch.Tensor:
    return rosenbrock(samples.double())


def _generation(strategy, samples: torch.Tensor | None = None) -> None:
    samples = strategy.ask() if samples is None else samples
    strategy.tell(samples, _values(samples))


def _saved_and_loaded(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _assert_same_run(strategy, reference) -> None:
    """Bit-for-bit equality of everything the run depends on, and of the next samples."""
    assert strategy.generation == reference.generation
    assert torch.equal(strategy.mean, reference.mean)
    assert torch.equal(strategy.covariance, reference.covariance)
    if isinstance(reference, XNES):
        assert strategy.sigma == reference.sigma and torch.equal(strategy.shape, reference.shape)
    else:
        assert torch.equal(strategy.sigma, reference.sigma)
    assert torch.equal(strategy.generator.get_state(), reference.generator.get_state())
    assert torch.equal(strategy.ask(), reference.ask())


@pytest.mark.parametrize("method", ["xnes", "snes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("pending_ask", [False, True], ids=["told", "pending-ask"])
@pytest.mark.parametrize("k", range(4))
def test_an_interrupted_run_resumes_bit_for_bit(method, dtype, pending_ask, k):
    """Oracle: the uninterrupted run. With a pending ask, the samples asked before saving are
    told after loading, with their exact noise (recomputing it would change the last bits)."""
    reference = _build(method, dtype)
    for _ in range(GENERATIONS):
        _generation(reference)
    interrupted = _build(method, dtype)
    for _ in range(k):
        _generation(interrupted)
    asked = interrupted.ask() if pending_ask else None
    resumed = _fresh(method, dtype)
    resumed.load_state_dict(_saved_and_loaded(interrupted.state_dict()))
    _generation(resumed, asked)
    for _ in range(GENERATIONS - k - 1):
        _generation(resumed)
    _assert_same_run(resumed, reference)


@pytest.mark.parametrize("method", ["xnes", "snes"])
def test_the_state_is_a_plain_dict_of_copies(method):
    strategy = _build(method, torch.float64)
    _generation(strategy)
    state = strategy.state_dict()
    assert state["strategy"] == type(strategy).__name__ and state["generation"] == 1
    assert state["asked_samples"] is None and state["asked_noise"] is None
    state["mean"].add_(1.0)
    assert not torch.equal(state["mean"], strategy.mean)
    samples = strategy.ask()
    assert torch.equal(strategy.state_dict()["asked_samples"], samples)


def _mismatches(method: str):
    other = "snes" if method == "xnes" else "xnes"
    yield "strategy", _build(other, torch.float64)
    yield "dim", _build(method, torch.float64, x0=[0.0, 0.0])
    yield "population_size", _build(method, torch.float64, population_size=8)
    yield "dtype", _build(method, torch.float32)


@pytest.mark.parametrize("method", ["xnes", "snes"])
@pytest.mark.parametrize("mismatch", ["strategy", "dim", "population_size", "dtype"])
def test_another_configuration_is_refused_by_name_and_changes_nothing(method, mismatch):
    source = _build(method, torch.float64)
    _generation(source)
    source.ask()
    target = dict(_mismatches(method))[mismatch]
    before = target.state_dict()
    with pytest.raises(ValueError, match=mismatch):
        target.load_state_dict(source.state_dict())
    _assert_states_equal(target.state_dict(), before)


def _assert_states_equal(state: dict, expected: dict) -> None:
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(state[key], value), key
        else:
            assert state[key] == value, key


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("mean", torch.full((3,), math.nan, dtype=torch.float64), "finite"),
        ("mean", torch.zeros(4, dtype=torch.float64), "shape"),
        ("generation", -1, "generation"),
        ("eta_mean", 0.0, "eta_mean"),
        ("asked_noise", None, "asked_samples"),
        ("generator_state", torch.zeros(3, dtype=torch.uint8), "generator_state"),
    ],
)
@pytest.mark.parametrize("method", ["xnes", "snes"])
def test_a_corrupted_state_is_refused_and_changes_nothing(method, key, value, message):
    source = _build(method, torch.float64)
    _generation(source)
    source.ask()
    state = source.state_dict()
    state[key] = value
    target = _fresh(method, torch.float64)
    before = target.state_dict()
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(state)
    _assert_states_equal(target.state_dict(), before)


def test_a_missing_key_is_named():
    state = _build("xnes", torch.float64).state_dict()
    del state["shape"]
    with pytest.raises(ValueError, match="shape"):
        _fresh("xnes", torch.float64).load_state_dict(state)
