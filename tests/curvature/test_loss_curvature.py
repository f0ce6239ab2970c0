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

from natgrad.curvature import builders, fisher, ggn, hessian

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


def _targets_for(kind: str, samples: int, generator: torch.Generator) -> torch.Tensor:
    """Targets of shape ``(samples, 3)`` (or ``(samples,)`` class indices) for a loss family."""
    shape = (samples, 3)
    if kind == "class":
        return torch.randint(0, 3, (samples,), generator=generator)
    if kind == "real":
        return torch.randn(shape, generator=generator, dtype=torch.float64)
    if kind == "binary":
        return torch.randint(0, 2, shape, generator=generator).to(torch.float64)
    if kind == "count":
        return torch.randint(0, 4, shape, generator=generator).to(torch.float64)
    return torch.softmax(torch.randn(shape, generator=generator, dtype=torch.float64), -1)


# (loss class, keyword arguments, output head appended to the MLP, target kind)
SEPARABLE_CASES = [
    (nn.CrossEntropyLoss, {}, None, "class"),
    (nn.CrossEntropyLoss, {"label_smoothing": 0.1}, None, "probability"),
    (nn.NLLLoss, {}, nn.LogSoftmax(-1), "class"),
    (nn.MSELoss, {}, None, "real"),
    (nn.L1Loss, {}, None, "real"),
    (nn.HuberLoss, {"delta": 0.5}, None, "real"),
    (nn.SmoothL1Loss, {"beta": 0.5}, None, "real"),
    (nn.BCELoss, {}, nn.Sigmoid(), "binary"),
    (nn.BCEWithLogitsLoss, {"pos_weight": torch.tensor([1.0, 2.0, 0.5])}, None, "binary"),
    (nn.PoissonNLLLoss, {}, None, "count"),
    (nn.KLDivLoss, {}, nn.LogSoftmax(-1), "probability"),
    (nn.MultiLabelSoftMarginLoss, {}, None, "binary"),
]


def _separable_problem(head, kind: str):
    model = tiny_mlp()
    if head is not None:
        model = nn.Sequential(model, head)
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    return model, inputs, _targets_for(kind, len(inputs), generator)


def _forbid_general_path(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the separable loss took the general (coupled) path")

    monkeypatch.setattr(builders, "_coupled_ggn", refuse)


TORCH_LOSS_WARNINGS = "ignore::UserWarning"
"""torch warns about its own vmap fallbacks (kl_div, multilabel soft margin) and KLDiv 'mean'."""


@pytest.mark.filterwarnings(TORCH_LOSS_WARNINGS)
@pytest.mark.parametrize(("loss_class", "options", "head", "kind"), SEPARABLE_CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("structure", ["dense", "diag", "block"])
def test_separable_torch_losses_use_per_sample_path_and_match_brute_force(
    loss_class, options, head, kind: str, reduction: str, structure: str, monkeypatch
) -> None:
    model, inputs, targets = _separable_problem(head, kind)
    loss_fn = loss_class(reduction=reduction, **options)
    reference = loss_ggn(model, inputs, loss_fn, targets)
    _forbid_general_path(monkeypatch)
    operator = ggn(model, inputs, loss_fn, targets, structure=structure)
    expected = expected_in_structure(reference, structure, FlatModel(model).block_slices())
    torch.testing.assert_close(operator.to_dense(), expected)


@pytest.mark.filterwarnings(TORCH_LOSS_WARNINGS)
def test_kl_divergence_batchmean_is_separable(monkeypatch) -> None:
    model, inputs, targets = _separable_problem(nn.LogSoftmax(-1), "probability")
    loss_fn = nn.KLDivLoss(reduction="batchmean")
    reference = loss_ggn(model, inputs, loss_fn, targets)
    _forbid_general_path(monkeypatch)
    torch.testing.assert_close(ggn(model, inputs, loss_fn, targets).to_dense(), reference)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_declared_separable_function_matches_brute_force(reduction: str, monkeypatch) -> None:
    model, inputs, targets = _separable_problem(None, "real")
    variance = torch.tensor([[0.5, 1.0, 2.0]], dtype=torch.float64)
    gaussian = nn.GaussianNLLLoss(reduction=reduction)

    def loss_fn(outputs: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        return gaussian(outputs, observed, variance.expand_as(outputs))

    reference = loss_ggn(model, inputs, loss_fn, targets)
    _forbid_general_path(monkeypatch)
    operator = ggn(model, inputs, loss_fn, targets, separable=reduction)
    torch.testing.assert_close(operator.to_dense(), reference)
    gaussian_true = ggn(
        model, inputs, gaussian_wrapper(gaussian, variance), targets, separable=True
    )
    torch.testing.assert_close(gaussian_true.to_dense(), reference)


def gaussian_wrapper(gaussian: nn.GaussianNLLLoss, variance: torch.Tensor):
    """A callable with a ``reduction`` attribute, as ``separable=True`` reads it."""

    class WithVariance(nn.Module):
        reduction = gaussian.reduction

        def forward(self, outputs: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
            return gaussian(outputs, observed, variance.expand_as(outputs))

    return WithVariance()


@pytest.mark.parametrize("structure", ["dense", "diag", "block"])
def test_weighted_cross_entropy_falls_back_to_the_general_path(structure: str) -> None:
    """Class weights make the mean a weighted mean: not ``1/N Σ ℓₙ``, so the general path."""
    model, inputs, targets = _separable_problem(None, "class")
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64))
    reference = loss_ggn(model, inputs, loss_fn, targets)
    operator = ggn(model, inputs, loss_fn, targets, structure=structure)
    expected = expected_in_structure(reference, structure, FlatModel(model).block_slices())
    torch.testing.assert_close(operator.to_dense(), expected)


@pytest.mark.parametrize("structure", ["dense", "diag", "block"])
def test_coupled_loss_declared_not_separable_matches_brute_force(structure: str) -> None:
    model = tiny_mlp()
    inputs, targets = tiny_data("gaussian")
    reference = loss_ggn(model, inputs, coupled_loss, targets)
    operator = ggn(model, inputs, coupled_loss, targets, structure=structure, separable=False)
    expected = expected_in_structure(reference, structure, FlatModel(model).block_slices())
    torch.testing.assert_close(operator.to_dense(), expected)


def test_general_path_in_small_column_chunks_matches_brute_force(monkeypatch) -> None:
    model = tiny_mlp()
    inputs, targets = tiny_data("gaussian")
    reference = loss_ggn(model, inputs, coupled_loss, targets)
    monkeypatch.setattr(builders, "ROW_BUDGET", 7 * inputs.shape[0] * 3)
    for structure in ("dense", "diag", "block"):
        operator = ggn(model, inputs, coupled_loss, targets, structure=structure)
        expected = expected_in_structure(reference, structure, FlatModel(model).block_slices())
        torch.testing.assert_close(operator.to_dense(), expected)


def test_coupled_loss_declared_separable_is_refused() -> None:
    model = tiny_mlp()
    inputs, targets = tiny_data("gaussian")
    with pytest.raises(ValueError, match="declared separable"):
        ggn(model, inputs, coupled_loss, targets, separable="mean")


@pytest.mark.parametrize("separable", ["average", 1, True])
def test_bad_separable_argument_is_refused(separable) -> None:
    model = tiny_mlp()
    inputs, targets = tiny_data("gaussian")
    with pytest.raises(ValueError, match="separable"):
        ggn(model, inputs, coupled_loss, targets, separable=separable)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_separable_path_with_one_output_per_sample(reduction: str, monkeypatch) -> None:
    """Outputs of shape ``(N,)``: each sample's output Hessian is ``1 × 1``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten(0)).double()
    generator = torch.Generator().manual_seed(4)
    inputs = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 2, (6,), generator=generator).to(torch.float64)
    loss_fn = nn.BCEWithLogitsLoss(reduction=reduction)
    reference = loss_ggn(model, inputs, loss_fn, targets)
    _forbid_general_path(monkeypatch)
    torch.testing.assert_close(ggn(model, inputs, loss_fn, targets).to_dense(), reference)
