"""K-FAC/EKFAC under activation checkpointing (``torch.utils.checkpoint``) of the layers recorded
through recording modes or expanded inputs (:mod:`kfac_layer_kinds`): the checkpointed module
(the recurrent layer or cell, the transformer layer, the attention, the transposed convolution)
runs again in the backward pass, and must run there as it ran forward, unrolled or with its
projections recorded, whatever the preconditioner is doing. Training must equal training
without checkpointing, as documented in ``docs/kfac.md`` (float64, 5 steps, to round-off)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kfac_layer_kinds import (
    KINDS,
    batches,
    make_model,
    parameters,
    precondition_options,
    train_step,
)
from natgrad.optim import EKFAC, KFAC

BODIES = {
    "lstm_proj": "recurrent",
    "gru_bidirectional": "recurrent",
    "lstm_cell": "cell",
    "encoder": "layer",
    "decoder": "layer",
    "separate_projections": "attention",
    "conv_transpose": "up",
}
CONFIGS = [(KFAC, "empirical"), (EKFAC, "mc")]  # alternating over the kinds


class Checkpointed(nn.Module):
    """``body`` run through ``torch.utils.checkpoint.checkpoint``."""

    def __init__(self, body: nn.Module, reentrant: bool) -> None:
        super().__init__()
        self.body, self.reentrant = body, reentrant

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(self.body, *args, use_reentrant=self.reentrant, **kwargs)


def train(kind: str, cls, fisher_type: str, checkpointing: str | None):
    """Parameters and preconditioner after 5 steps; ``checkpointing`` None, ``"reentrant"`` or
    ``"non-reentrant"``."""
    model = make_model(kind)
    if checkpointing is not None:
        body = getattr(model, BODIES[kind])
        setattr(model, BODIES[kind], Checkpointed(body, checkpointing == "reentrant"))
    precond = cls(model, **precondition_options(fisher_type))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    for inputs, targets in batches(kind, 5, 16):
        # the reentrant variant builds a graph through the body only from inputs needing grad
        inputs.requires_grad_(checkpointing == "reentrant")
        train_step(model, precond, optimizer, [(inputs, targets)])
    return parameters(model), precond


def assert_same_training(kind: str, cls, fisher_type: str, checkpointing: str) -> None:
    expected, plain = train(kind, cls, fisher_type, None)
    got, checkpointed = train(kind, cls, fisher_type, checkpointing)
    for ours, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    for ours, theirs in zip(checkpointed.layers, plain.layers, strict=True):
        assert ours.input_factor is not None, ours.name
        torch.testing.assert_close(ours.input_factor, theirs.input_factor, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(ours.output_factor, theirs.output_factor, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    ("kind", "cls", "fisher_type"),
    [(kind, *config) for kind, config in zip(KINDS, CONFIGS * len(KINDS), strict=False)],
)
def test_non_reentrant_checkpointing_trains_as_without(kind: str, cls, fisher_type: str) -> None:
    """The weight-locality probe back-propagates with recording paused: the checkpoint's
    recomputation inside it must still run the unrolled (recurrent) or explicit (attention)
    forward that it recomputes, or checkpointing raises or the probe sees other gradients."""
    assert_same_training(kind, cls, fisher_type, "non-reentrant")


@pytest.mark.parametrize("kind", ["gru_bidirectional", "decoder"])
def test_reentrant_checkpointing_trains_as_without(kind: str) -> None:
    """The reentrant variant runs the body without gradients first (nothing recorded) and
    records the recomputation, the only pass that back-propagates. (Not for the
    ``nn.LSTMCell`` loop, which reentrant checkpointing cannot back-propagate even without
    K-FAC, nor for the attention called with keyword arguments, which it does not take; the
    LSTM and the encoder layer take the paths of the GRU and the decoder layer.)"""
    assert_same_training(kind, KFAC, "empirical", "reentrant")
