"""Interrupting K-FAC/EKFAC training on the layer kinds recorded through recording modes or
expanded inputs (recurrent layers and cells, attentions, a transposed convolution:
:mod:`kfac_layer_kinds`) and resuming it: from a checkpoint of ``state_dict()`` saved with
``torch.save`` and read with ``torch.load``'s defaults, and from a copy of the model, the
preconditioner and the optimizer together (``copy.deepcopy`` or ``pickle``), both documented in
``docs/kfac.md`` to continue exactly as the uninterrupted run.

The run is interrupted after 3 steps: statistics were recorded on steps 0 and 2 (averaged),
eigenbases refreshed on step 0; the next step refreshes them without new statistics (EKFAC
restarts its eigenvalues there), and the 5 steps resumed record twice more. The resumed
parameters must equal the uninterrupted run's bit for bit."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch

from kfac_layer_kinds import (
    KINDS,
    LAYER_NAMES,
    batches,
    make_model,
    parameters,
    precondition_options,
    train_step,
)
from natgrad.optim import EKFAC, KFAC

SAVED_AFTER, STEPS = 3, 8
CONFIGS = [(KFAC, "mc"), (EKFAC, "empirical")]


def build(kind: str, model: torch.nn.Module, cls, fisher_type: str):
    precond = cls(model, **precondition_options(fisher_type))
    assert [state.name for state in precond.layers] == LAYER_NAMES[kind]
    return precond, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)


def train(model, precond, optimizer, data) -> None:
    for batch in data:
        train_step(model, precond, optimizer, [batch])


def uninterrupted_and_checkpoint(kind: str, cls, fisher_type: str) -> tuple[list, bytes]:
    """The parameters after ``STEPS`` steps, and the checkpoint saved after ``SAVED_AFTER``."""
    data = batches(kind, STEPS, 16)
    model = make_model(kind)
    precond, optimizer = build(kind, model, cls, fisher_type)
    train(model, precond, optimizer, data[:SAVED_AFTER])
    buffer = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "precond": precond.state_dict(),
        },
        buffer,
    )
    train(model, precond, optimizer, data[SAVED_AFTER:])
    return parameters(model), buffer.getvalue()


@pytest.mark.parametrize(("cls", "fisher_type"), CONFIGS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_run_resumed_from_its_state_dict_continues_bit_for_bit(kind, cls, fisher_type) -> None:
    expected, saved = uninterrupted_and_checkpoint(kind, cls, fisher_type)
    checkpoint = torch.load(io.BytesIO(saved))  # weights_only: plain tensors and numbers
    resumed = make_model(kind)
    resumed.load_state_dict(checkpoint["model"])
    precond, optimizer = build(kind, resumed, cls, fisher_type)
    optimizer.load_state_dict(checkpoint["optimizer"])
    precond.load_state_dict(checkpoint["precond"])
    assert precond.steps == SAVED_AFTER
    train(resumed, precond, optimizer, batches(kind, STEPS, 16)[SAVED_AFTER:])
    for got, want in zip(parameters(resumed), expected, strict=True):
        assert torch.equal(got, want)


COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda run: pickle.loads(pickle.dumps(run))}


@pytest.mark.parametrize(
    ("kind", "copier"),
    list(zip(KINDS, [*COPIES] * len(KINDS), strict=False)),  # alternating
)
def test_a_copy_of_model_preconditioner_and_optimizer_continues_as_the_original(
    kind, copier
) -> None:
    """Copied together mid-run, the copied preconditioner records the copied layers (no
    layer is silent: that would warn) and takes the original's steps."""
    data = batches(kind, STEPS, 16)
    model = make_model(kind)
    precond, optimizer = build(kind, model, KFAC, "empirical")
    train(model, precond, optimizer, data[:SAVED_AFTER])
    copied, copied_precond, copied_optimizer = COPIES[copier]((model, precond, optimizer))
    train(model, precond, optimizer, data[SAVED_AFTER:])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        train(copied, copied_precond, copied_optimizer, data[SAVED_AFTER:])
    for got, want in zip(parameters(copied), parameters(model), strict=True):
        assert torch.equal(got, want)
