"""Gradient accumulation on the layer kinds recorded through recording modes or expanded inputs
(:mod:`kfac_layer_kinds`): two half-batches with ``accumulation_steps=2``, each loss its
half's mean divided by 2, must take the steps of one full batch, as documented in
``docs/kfac.md``. Every micro-batch's pass through an unrolled recurrent layer or an
attention's recorded projections adds its own samples: the factors and EKFAC's eigenvalues
are the full batch's, in float64 to round-off, over 5 steps (statistics averaged over 3 of
them, eigenbases refreshed on 2). The exact Fisher is compared rather than the Monte-Carlo one,
whose draws depend on how the batch is split. Micro-batches of unequal sizes still record the
full batch's factors (their accumulated gradient, a mean of means, differs)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kfac_layer_kinds import (
    KINDS,
    batches,
    make_model,
    parameters,
    precondition_options,
    train_step,
)
from natgrad.optim import EKFAC, KFAC


def train(kind: str, cls, fisher_type: str, micro_batches: int):
    """Parameters and preconditioner after 5 steps on batches of 16."""
    model = make_model(kind)
    precond = cls(model, **precondition_options(fisher_type), accumulation_steps=micro_batches)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    for inputs, targets in batches(kind, 5, 16):
        parts = zip(inputs.chunk(micro_batches), targets.chunk(micro_batches), strict=True)
        train_step(model, precond, optimizer, list(parts))
    return parameters(model), precond


@pytest.mark.parametrize(("cls", "fisher_type"), [(KFAC, "empirical"), (EKFAC, "exact")])
@pytest.mark.parametrize("kind", KINDS)
def test_two_accumulated_halves_step_as_the_full_batch(kind: str, cls, fisher_type: str) -> None:
    expected, full = train(kind, cls, fisher_type, micro_batches=1)
    got, halves = train(kind, cls, fisher_type, micro_batches=2)
    initial = parameters(make_model(kind))
    assert max(float((a - b).abs().max()) for a, b in zip(expected, initial, strict=True)) > 1e-2
    for ours, theirs in zip(halves.layers, full.layers, strict=True):
        torch.testing.assert_close(ours.input_factor, theirs.input_factor, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(ours.output_factor, theirs.output_factor, rtol=1e-10, atol=1e-14)
        if cls is EKFAC:
            torch.testing.assert_close(ours.eigenvalues, theirs.eigenvalues, rtol=1e-9, atol=1e-14)
    for ours, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(KINDS), split=st.integers(1, 15))
def test_unequal_micro_batches_record_the_full_batch_factors(kind: str, split: int) -> None:
    """One step on the micro-batches ``[:split]`` and ``[split:]`` of a batch of 16."""
    factors = []
    for parts in ([slice(None)], [slice(None, split), slice(split, None)]):
        model = make_model(kind)
        precond = EKFAC(model, **precondition_options("empirical"), accumulation_steps=len(parts))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        inputs, targets = batches(kind, 1, 16)[0]
        train_step(model, precond, optimizer, [(inputs[part], targets[part]) for part in parts])
        factors.append(
            [
                (state.input_factor, state.output_factor, state.eigenvalues)
                for state in precond.layers
            ]
        )
    for ours, theirs in zip(*factors, strict=True):
        for got, want in zip(ours, theirs, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
