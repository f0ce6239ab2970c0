"""K-FAC/EKFAC with the forward pass under ``torch.autocast("cpu", dtype=torch.bfloat16)`` on the
layer kinds recorded through recording modes or expanded inputs (:mod:`kfac_layer_kinds`):
the unrolled recurrent products and the attentions' recorded projections run in bfloat16,
while the factors (and EKFAC's eigenvalues) stay float32, as documented in ``docs/kfac.md``.

The float32 run on the same model and batch is the reference. One step that records and
refreshes (the criterion of ``test_kfac_optim.py``'s autocast test): the factors within 5 %
(plus 0.02 absolute) of the float32 ones, the preconditioned gradients finite, within 10 %
(plus 0.05) of the float32 ones, and in the same direction (cosine above 0.99)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_layer_kinds import KINDS, batches, make_model
from natgrad.optim import EKFAC, KFAC


def one_step(kind: str, cls, autocast: bool):
    """The preconditioner and the preconditioned gradients after one float32-model step."""
    model = make_model(kind, torch.float32)
    precond = cls(model, inv_update_interval=1, damping=0.1)
    inputs, targets = batches(kind, 1, 16, torch.float32)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        outputs = model(inputs)
    if autocast:
        assert outputs.dtype == torch.bfloat16  # the products did run in bfloat16
    nn.functional.cross_entropy(outputs.float(), targets).backward()
    precond.step()
    return precond, [param.grad.clone() for param in model.parameters()]


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_autocast_keeps_float32_factors_and_the_step_direction(kind, cls) -> None:
    precond, grads = one_step(kind, cls, autocast=True)
    reference, expected = one_step(kind, cls, autocast=False)
    for state, wanted in zip(precond.layers, reference.layers, strict=True):
        assert state.input_factor.dtype == state.output_factor.dtype == torch.float32
        if cls is EKFAC:
            assert state.eigenvalues.dtype == torch.float32
        torch.testing.assert_close(state.input_factor, wanted.input_factor, rtol=0.05, atol=0.02)
        torch.testing.assert_close(state.output_factor, wanted.output_factor, rtol=0.05, atol=0.02)
    for grad, want in zip(grads, expected, strict=True):
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
        torch.testing.assert_close(grad, want, rtol=0.1, atol=0.05)
    flat, flat_expected = (
        torch.cat([g.flatten() for g in grads]),
        torch.cat([g.flatten() for g in expected]),
    )
    assert float(nn.functional.cosine_similarity(flat, flat_expected, dim=0)) > 0.99
