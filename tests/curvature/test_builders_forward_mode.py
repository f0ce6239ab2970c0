"""Loss curvature products for losses torch cannot differentiate in forward mode (Huber)."""

import pytest
import torch
import torch.nn.functional as functional
from brute_force import DTYPE, loss_ggn, loss_hessian, relative_error, tiny_mlp
from torch import Tensor, nn

import natgrad


def huber_of_centred_outputs(outputs: Tensor, targets: Tensor) -> Tensor:
    """A Huber loss that couples the samples through the batch mean (the general GGN path)."""
    return functional.huber_loss(outputs - outputs.mean(0), targets, delta=1.0)


LOSSES = {
    "huber": nn.HuberLoss(delta=1.0),
    "smooth_l1": nn.SmoothL1Loss(beta=1.5),
    "coupled_huber": huber_of_centred_outputs,
}


def data() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(5, 3, generator=generator, dtype=DTYPE)
    return inputs, torch.randn(5, 2, generator=generator, dtype=DTYPE)


@pytest.mark.parametrize("loss", LOSSES)
def test_implicit_ggn_matches_brute_force(loss: str) -> None:
    model, (inputs, targets) = tiny_mlp(2), data()
    built = natgrad.ggn(model, inputs, LOSSES[loss], targets, structure="implicit")
    expected = loss_ggn(model, inputs, LOSSES[loss], targets)
    assert expected.abs().max() > 1e-3
    assert relative_error(built.to_dense(), expected) < 1e-12


@pytest.mark.parametrize("loss", LOSSES)
def test_implicit_hessian_matches_brute_force(loss: str) -> None:
    model, (inputs, targets) = tiny_mlp(2), data()
    built = natgrad.hessian(model, inputs, LOSSES[loss], targets, structure="implicit")
    expected = loss_hessian(model, inputs, LOSSES[loss], targets)
    assert expected.abs().max() > 1e-3
    vector = torch.randn(len(expected), generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    assert relative_error(built.mv(vector), expected @ vector) < 1e-12


@pytest.mark.parametrize("structure", ["dense", "block"])
def test_coupled_huber_ggn_matches_brute_force(structure: str) -> None:
    model, (inputs, targets) = tiny_mlp(2), data()
    built = natgrad.ggn(model, inputs, huber_of_centred_outputs, targets, structure=structure)
    expected = loss_ggn(model, inputs, huber_of_centred_outputs, targets)
    assert expected.abs().max() > 1e-3
    assert relative_error(built.diag(), expected.diagonal()) < 1e-12
