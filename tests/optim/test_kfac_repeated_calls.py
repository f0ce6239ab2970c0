"""The K-FAC/EKFAC preconditioners on a layer called several times in one forward pass (weight
sharing across calls; models in ``tests/repeated_calls.py``): the calls' locations are pooled
as one call's.

Oracles:

- a siamese network, one Linear applied to each of a sample's two inputs, is the same function
  as that Linear applied once to the ``(N, 2, d)`` stack of them, which K-FAC treats as a layer
  with two locations per sample: trained side by side, factors, EKFAC eigenvalues and parameters
  agree;
- an unrolled cell, ``lin(tanh(lin(x)))``: its factors against brute force (autograd output
  gradients of each call) and its EKFAC eigenvalues against per-sample weight gradients from
  ``torch.func``;
- a depthwise convolution called twice against the same network with one ordinary
  convolution per group (:class:`grouped_conv.SplitConv`), called twice too;
- gradient accumulation: two micro-batches of the siamese network equal one batch.
"""

import copy

import pytest
import torch
from torch import nn

from grouped_conv import SplitConv
from kfac_training import fisher_options, train_steps
from natgrad.optim import EKFAC, KFAC
from repeated_calls import (
    DTYPE,
    TwiceConv,
    segments_pair,
    siamese_batch,
    siamese_pair,
    unrolled_batch,
    unrolled_calls,
    unrolled_cell_gradients,
)


def train_pair(model, twin, cls, fisher_type, steps=3, twin_options=None, **options):
    """Train both with SGD-momentum under ``cls``; the two preconditioners."""
    preconds = []
    for network, extra in ((model, {}), (twin, twin_options or {})):
        precond = cls(network, **fisher_options(fisher_type, 0), **(options | extra))
        optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9)
        train_steps(network, precond, optimizer, *siamese_batch(), steps)
        preconds.append(precond)
    return preconds


def assert_states_agree(state, twin_state) -> None:
    torch.testing.assert_close(state.input_factor, twin_state.input_factor)
    torch.testing.assert_close(state.output_factor, twin_state.output_factor)
    if state.eigenvalues is not None or twin_state.eigenvalues is not None:
        torch.testing.assert_close(state.eigenvalues, twin_state.eigenvalues)


@pytest.mark.parametrize("fisher_type", ["empirical", "mc", "exact"])
@pytest.mark.parametrize(
    ("cls", "mode"),
    [
        pytest.param(KFAC, {"damping_mode": "eigen"}, id="kfac-eigen"),
        pytest.param(KFAC, {"damping_mode": "factored"}, id="kfac-factored"),
        pytest.param(EKFAC, {}, id="ekfac"),
    ],
)
def test_calls_pool_like_locations_of_one_call(cls, mode: dict, fisher_type: str) -> None:
    model, twin = siamese_pair()
    options = {"inv_update_interval": 1, "damping": 0.1, "factor_decay": 0.5} | mode
    precond, twin_precond = train_pair(model, twin, cls, fisher_type, **options)
    for state, twin_state in zip(precond.layers, twin_precond.layers, strict=True):
        assert_states_agree(state, twin_state)
    for param, twin_param in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(param, twin_param)


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_calls_with_different_numbers_of_locations_pool_them(cls) -> None:
    """2 and 3 tokens per call pool as one call on 5."""
    model, twin, inputs, targets = segments_pair()
    preconds = []
    for network in (model, twin):
        precond = cls(network, inv_update_interval=1, damping=0.1)
        optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9)
        train_steps(network, precond, optimizer, inputs, targets, 3)
        preconds.append(precond)
    for state, twin_state in zip(*(precond.layers for precond in preconds), strict=True):
        assert_states_agree(state, twin_state)
    torch.testing.assert_close(model.lin.weight, twin.lin.weight)


def test_reduce_reduces_within_each_call_and_pools_the_calls() -> None:
    """Each call of ``lin`` has one location, so reduce leaves it alone, and the two calls
    pool as expand pools the stack's two locations (reducing the stack would average them)."""
    model, twin = siamese_pair()
    options = {"inv_update_interval": 1, "damping": 0.1}
    precond, twin_precond = train_pair(
        model,
        twin,
        KFAC,
        "empirical",
        twin_options={"kfac_approx": "expand"},
        kfac_approx="reduce",
        **options,
    )
    assert_states_agree(precond.layers[0], twin_precond.layers[0])
    torch.testing.assert_close(model.lin.weight, twin.lin.weight)
    _, reduced_twin = siamese_pair()
    reduced = train_pair(model, reduced_twin, KFAC, "empirical", kfac_approx="reduce", **options)
    assert not torch.allclose(reduced[0].layers[0].input_factor, reduced[1].layers[0].input_factor)


def test_accumulated_micro_batches_of_repeated_calls_equal_one_batch() -> None:
    model, _ = siamese_pair()
    reference = copy.deepcopy(model)
    inputs, targets = siamese_batch(8)
    options = {"inv_update_interval": 1, "damping": 0.1}
    precond = KFAC(reference, **options)
    nn.functional.cross_entropy(reference(inputs), targets).backward()
    precond.step()

    accumulating = KFAC(model, **options, accumulation_steps=2)
    for half in (slice(0, 4), slice(4, 8)):
        (nn.functional.cross_entropy(model(inputs[half]), targets[half]) / 2).backward()
    accumulating.step()
    for state, reference_state in zip(accumulating.layers, precond.layers, strict=True):
        assert_states_agree(state, reference_state)
    for param, reference_param in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(param.grad, reference_param.grad)


def test_unrolled_cell_factors_against_brute_force() -> None:
    model, inputs, targets = unrolled_batch(1)
    features, grads = unrolled_calls(model, inputs, targets)
    precond = KFAC(model, inv_update_interval=1, damping=0.1)
    nn.functional.cross_entropy(model(inputs), targets).backward()
    precond.step()
    state = precond.layers[0]
    rows, grad_rows = features.reshape(-1, 4), grads.reshape(-1, 3)
    torch.testing.assert_close(state.input_factor, rows.T @ rows / 14)
    torch.testing.assert_close(state.output_factor, grad_rows.T @ grad_rows / 7)


def test_unrolled_cell_ekfac_eigenvalues_from_per_sample_gradients() -> None:
    """EKFAC's eigenvalues are the mean over samples of the squared eigenbasis coordinates of
    each sample's gradient, which sums both calls' contributions (from ``torch.func``)."""
    model, inputs, targets = unrolled_batch(2)
    gradients = unrolled_cell_gradients(model, inputs, targets)
    precond = EKFAC(model, inv_update_interval=1, damping=0.1, eigenvalue_restart="batch")
    nn.functional.cross_entropy(model(inputs), targets).backward()
    precond.step()
    state = precond.layers[0]
    coordinates = state.output_eigen.vectors.T @ gradients @ state.input_eigen.vectors
    torch.testing.assert_close(state.eigenvalues, coordinates.square().mean(0))


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_grouped_conv_called_twice_matches_one_conv_per_group(cls, kfac_approx: str) -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=2).to(DTYPE)
    model = TwiceConv(conv, nn.Linear(4 * 16, 3).to(DTYPE))
    twin = TwiceConv(SplitConv(conv), copy.deepcopy(model.head))
    generator = torch.Generator().manual_seed(3)
    # more samples than a group's 19 input features: a singular reduce A would leave EKFAC's
    # eigenvalues in its null space to the eigensolver
    inputs = torch.randn(24, 4, 4, 4, generator=generator, dtype=DTYPE)
    targets = torch.randint(0, 3, (24,), generator=generator)
    options = {"inv_update_interval": 1, "damping": 0.1, "kfac_approx": kfac_approx}
    preconds = []
    for network in (model, twin):
        precond = cls(network, **options)
        optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9)
        train_steps(network, precond, optimizer, inputs, targets, 3)
        preconds.append(precond)
    grouped = preconds[0].layers[0]
    for group, state in enumerate(preconds[1].layers[:-1]):
        torch.testing.assert_close(grouped.input_factor[group], state.input_factor)
        torch.testing.assert_close(grouped.output_factor[group], state.output_factor)
        if cls is EKFAC:
            torch.testing.assert_close(grouped.eigenvalues[group], state.eigenvalues)
    split_weight = torch.cat([part.weight for part in twin.conv.parts])
    torch.testing.assert_close(model.conv.weight, split_weight)
