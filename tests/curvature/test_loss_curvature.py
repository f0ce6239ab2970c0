"""natgrad.ggn and natgrad.hessian against float64 brute force (torch.func over flat parameters)."""

import pytest
import torch
import torch.nn.functional as functional
from brute_force import (
    LIKELIHOOD_NAMES,
    FlatModel,
    block_diagonal,
    loss_ggn,
    loss_hessian,
    tiny_data,
    tiny_mlp,
)
from torch import nn

from natgrad.curvature import fisher, ggn, hessian

STRUCTURES = ("dense", "diag", "block", "implicit")


def canonical_loss(likelihood: str, samples: int):
    """The mean negative log-likelihood whose GGN is the ``likelihood`` Fisher."""
    if likelihood == "categorical":
        return nn.CrossEntropyLoss()
    if likelihood == "gaussian":
        return lambda f, y: nn.MSELoss(reduction="sum")(f, y) / (2 * samples)
    if likelihood == "bernoulli":
        return lambda f, y: nn.BCEWithLogitsLoss(reduction="sum")(f, y) / samples
    return lambda f, y: nn.PoissonNLLLoss(log_input=True, reduction="sum")(f, y) / samples


def expected_in_structure(reference: torch.Tensor, structure: str, slices) -> torch.Tensor:
    if structure == "diag":
        return torch.diag(reference.diagonal())
    if structure == "block":
        return torch.block_diag(*block_diagonal(reference, slices))
    return reference


def softmax_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A non-canonical loss: squared error of the softmax probabilities, mean over samples."""
    onehot = functional.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)
    return (torch.softmax(outputs, -1) - onehot).pow(2).sum(-1).mean()


def coupled_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A loss that is not a sum over samples (couples them through the batch mean)."""
    residual = outputs - targets
    return residual.mean(0).pow(2).sum() + 0.5 * residual.pow(2).mean()


@pytest.mark.parametrize("likelihood", LIKELIHOOD_NAMES)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_ggn_equals_fisher_for_canonical_links(likelihood: str, structure: str) -> None:
    model = tiny_mlp()
    inputs, targets = tiny_data(likelihood)
    loss_fn = canonical_loss(likelihood, len(inputs))
    gauss_newton = ggn(model, inputs, loss_fn, targets, structure=structure)
    fisher_operator = fisher(model, inputs, likelihood=likelihood, structure=structure)
    torch.testing.assert_close(gauss_newton.to_dense(), fisher_operator.to_dense())


@pytest.mark.parametrize(
    ("loss_fn", "likelihood"), [(softmax_squared_error, "categorical"), (coupled_loss, "gaussian")]
)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_ggn_matches_brute_force(loss_fn, likelihood: str, structure: str) -> None:
    model = tiny_mlp()
    inputs, targets = tiny_data(likelihood)
    reference = loss_ggn(model, inputs, loss_fn, targets)
    operator = ggn(model, inputs, loss_fn, targets, structure=structure)
    expected = expected_in_structure(reference, structure, FlatModel(model).block_slices())
    torch.testing.assert_close(operator.to_dense(), expected)


@pytest.mark.parametrize(
    ("loss_fn", "likelihood"),
    [(nn.CrossEntropyLoss(), "categorical"), (softmax_squared_error, "categorical")],
)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_hessian_matches_torch_func_hessian(loss_fn, likelihood: str, structure: str) -> None:
    model = tiny_mlp()
    inputs, targets = tiny_data(likelihood)
    reference = loss_hessian(model, inputs, loss_fn, targets)
    operator = hessian(model, inputs, loss_fn, targets, structure=structure)
    expected = expected_in_structure(reference, structure, FlatModel(model).block_slices())
    torch.testing.assert_close(operator.to_dense(), expected)
    torch.testing.assert_close(operator.diag(), reference.diagonal())
