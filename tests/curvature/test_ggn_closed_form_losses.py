"""Closed-form output Hessians of the standard torch losses in ``natgrad.ggn``.

Oracles, all float64: ``torch.func.hessian`` of the per-sample loss (the roots), the dense GGN
``Jᵀ ∇²_f L J`` from ``torch.func.jacrev`` of the model and ``torch.func.hessian`` of the whole
loss in the outputs (the operators), and, for K-FAC/EKFAC on more than one sample, where they
are not exact, the general path forced by hiding the closed form.
"""

import math

import pytest
import torch
from brute_force import FlatModel, block_diagonal, loss_ggn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import hessian, vmap

from natgrad.curvature import builders, fisher, ggn
from natgrad.curvature.loss_hessians import output_hessian_roots

DTYPE = torch.float64
RTOL = 1e-10
CLOSED_FORM_LOSSES = ("cross_entropy", "probabilities", "bce", "mse", "poisson")
MATRIX_STRUCTURES = ("dense", "diag", "block")
KRONECKER_STRUCTURES = ("kfac", "ekfac")


class Case:
    """A model with outputs of shape ``(N, *shape)``, inputs, a loss and its targets."""

    def __init__(self, loss: str, reduction: str, samples: int, shape: tuple, seed: int) -> None:
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        size = math.prod(shape)
        head = [nn.Unflatten(1, shape)] if len(shape) > 1 else []
        head = [nn.Flatten(0)] if not shape else head
        self.model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, size), *head)
        self.model = self.model.to(DTYPE)
        self.inputs = torch.randn(samples, 3, generator=generator, dtype=DTYPE)
        self.loss_fn, self.targets = _loss_and_targets(loss, reduction, samples, shape, generator)

    def oracle(self) -> Tensor:
        return loss_ggn(self.model, self.inputs, self.loss_fn, self.targets)

    def ggn(self, structure: str, **options) -> Tensor:
        operator = ggn(self.model, self.inputs, self.loss_fn, self.targets, structure, **options)
        return operator.to_dense()


def _loss_and_targets(loss: str, reduction: str, samples: int, shape: tuple, generator):
    full = (samples, *shape)
    smoothing = float(torch.rand((), generator=generator)) * 0.3
    if loss == "cross_entropy":
        labels = torch.randint(0, shape[0], (samples, *shape[1:]), generator=generator)
        return nn.CrossEntropyLoss(reduction=reduction, label_smoothing=smoothing), labels
    if loss == "probabilities":  # not normalised: the Hessian scales with each target's sum
        weights = 2.0 * torch.rand(full, generator=generator, dtype=DTYPE)
        return nn.CrossEntropyLoss(reduction=reduction, label_smoothing=smoothing), weights
    if loss == "bce":
        return nn.BCEWithLogitsLoss(reduction=reduction), torch.rand(full, dtype=DTYPE)
    if loss == "mse":
        return nn.MSELoss(reduction=reduction), torch.randn(full, dtype=DTYPE)
    full_stirling = bool(torch.randint(0, 2, (), generator=generator))
    counts = torch.randint(0, 5, full, generator=generator).to(DTYPE)
    return nn.PoissonNLLLoss(log_input=True, full=full_stirling, reduction=reduction), counts


def _shapes(loss: str):
    """Per-sample output shapes: ``(C,)`` and ``(C, d)`` logits; elementwise losses also
    ``()`` (outputs ``(N,)``) and ``(2, d)``."""
    classes = st.integers(2, 4)
    if loss in ("cross_entropy", "probabilities"):
        return st.one_of(st.tuples(classes), st.tuples(classes, st.integers(1, 3)))
    return st.one_of(st.just(()), st.tuples(st.integers(1, 4)), st.tuples(st.just(2), classes))


@st.composite
def cases(draw, losses=CLOSED_FORM_LOSSES, max_samples: int = 5):
    loss = draw(st.sampled_from(losses))
    return Case(
        loss,
        draw(st.sampled_from(["mean", "sum"])),
        draw(st.integers(1, max_samples)),
        draw(_shapes(loss)),
        draw(st.integers(0, 2**16)),
    )


def in_structure(reference: Tensor, structure: str, model: nn.Module) -> Tensor:
    if structure == "diag":
        return torch.diag(reference.diagonal())
    if structure == "block":
        return torch.block_diag(*block_diagonal(reference, FlatModel(model).block_slices()))
    return reference


def per_layer(reference: Tensor, model: nn.Module) -> Tensor:
    """The blocks of ``reference`` of each Linear layer's weight and bias together."""
    slices = FlatModel(model).block_slices()
    layers = [
        slice(weight.start, bias.stop)
        for weight, bias in zip(slices[::2], slices[1::2], strict=True)
    ]
    return torch.block_diag(*block_diagonal(reference, layers))


def assert_close(estimate: Tensor, reference: Tensor) -> None:
    """Relative Frobenius error below ``RTOL`` (exact equality for a zero ``reference``)."""
    assert torch.linalg.norm(estimate - reference) <= RTOL * torch.linalg.norm(reference)


def forbid_general_paths(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a closed-form loss took the vmapped-Hessian or coupled path")

    monkeypatch.setattr(builders, "_per_sample_output_hessians", refuse)
    monkeypatch.setattr(builders, "_coupled_ggn", refuse)


def hide_closed_forms(monkeypatch) -> None:
    monkeypatch.setattr(builders, "output_hessian_roots", lambda *args: None)


# -- the roots -------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(case=cases(max_samples=4))
def test_roots_square_to_the_per_sample_loss_hessians(case: Case) -> None:
    outputs = case.model(case.inputs).detach()
    size = outputs[0].numel()

    def sample_loss(output: Tensor, target: Tensor) -> Tensor:
        return case.loss_fn(output.unsqueeze(0), target.unsqueeze(0))

    expected = vmap(hessian(sample_loss))(outputs, case.targets).reshape(-1, size, size)
    roots = output_hessian_roots(case.loss_fn, outputs, case.targets)
    assert roots.shape == (len(outputs), size, size)
    assert_close(roots @ roots.transpose(-1, -2), expected)


# -- the operators against the dense oracle ---------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(case=cases())
def test_matrix_structures_match_the_dense_oracle_without_vmapped_hessians(
    case: Case,
) -> None:
    reference = case.oracle()
    with pytest.MonkeyPatch.context() as monkeypatch:
        forbid_general_paths(monkeypatch)
        for structure in MATRIX_STRUCTURES:
            assert_close(case.ggn(structure), in_structure(reference, structure, case.model))


@settings(max_examples=15, deadline=None)
@given(case=cases())
def test_implicit_matches_the_dense_oracle(case: Case) -> None:
    assert_close(case.ggn("implicit"), case.oracle())


@settings(max_examples=25, deadline=None)
@given(case=cases(max_samples=1))
def test_kronecker_structures_are_exact_on_one_sample(case: Case) -> None:
    """On one sample every layer's GGN block is a Kronecker product (``a aᵀ ⊗ Bᵀ H B``)."""
    expected = per_layer(case.oracle(), case.model)
    with pytest.MonkeyPatch.context() as monkeypatch:
        forbid_general_paths(monkeypatch)
        for structure in KRONECKER_STRUCTURES:
            assert_close(case.ggn(structure), expected)


@settings(max_examples=25, deadline=None)
@given(case=cases())
def test_kronecker_structures_equal_the_general_path(case: Case) -> None:
    """The roots carry the general path's scaling ``(s N ∇²ℓ(fₙ))^{1/2}``."""
    closed_form = {structure: case.ggn(structure) for structure in KRONECKER_STRUCTURES}
    with pytest.MonkeyPatch.context() as monkeypatch:
        hide_closed_forms(monkeypatch)
        for structure in KRONECKER_STRUCTURES:
            assert_close(closed_form[structure], case.ggn(structure))


@pytest.mark.parametrize("structure", [*MATRIX_STRUCTURES, *KRONECKER_STRUCTURES, "implicit"])
def test_cross_entropy_ggn_is_the_exact_categorical_fisher(structure: str) -> None:
    case = Case("cross_entropy", "mean", 7, (4,), seed=5)
    case.loss_fn = nn.CrossEntropyLoss()
    exact = fisher(case.model, case.inputs, "categorical", "exact", structure)
    assert_close(case.ggn(structure), exact.to_dense())


# -- losses and options without a closed form -------------------------------------------------
class ScaledCrossEntropy(nn.CrossEntropyLoss):
    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return 3.0 * super().forward(outputs, targets) ** 2


class PlainSubclass(nn.MSELoss):
    """A subclass that changes nothing: still left to the general path (exact type check)."""


def _doubled(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    return 2.0 * output


def _hooked_bce() -> nn.BCEWithLogitsLoss:
    loss_fn = nn.BCEWithLogitsLoss()
    loss_fn.register_forward_hook(_doubled)
    return loss_fn


def _with_own_forward() -> nn.MSELoss:
    loss_fn = nn.MSELoss()
    loss_fn.forward = lambda outputs, targets: (outputs - targets).pow(4).mean()
    return loss_fn


def _open_cases():
    """``(label, loss, loss kind of the targets, per-sample output shape)``."""
    weight = torch.tensor([0.2, 1.0, 3.0], dtype=DTYPE)
    return [
        ("class weights", nn.CrossEntropyLoss(weight=weight), "cross_entropy", (3,)),
        (
            "weighted probabilities",
            nn.CrossEntropyLoss(weight=weight, reduction="sum"),
            "probabilities",
            (3,),
        ),
        ("pos_weight", nn.BCEWithLogitsLoss(pos_weight=weight), "bce", (3,)),
        ("bce weight", nn.BCEWithLogitsLoss(weight=weight, reduction="sum"), "bce", (3,)),
        ("subclass", ScaledCrossEntropy(), "cross_entropy", (3,)),
        ("plain subclass", PlainSubclass(), "mse", (3,)),
        ("forward hook", _hooked_bce(), "bce", (3,)),
        ("instance forward", _with_own_forward(), "mse", (3,)),
        ("rate input", nn.PoissonNLLLoss(log_input=False), "poisson", (3,)),
        ("log-softmax NLL", nn.NLLLoss(), "cross_entropy", (3,)),
    ]


@pytest.mark.parametrize(("label", "loss_fn", "kind", "shape"), _open_cases())
@pytest.mark.parametrize("structure", [*MATRIX_STRUCTURES, "implicit"])
def test_losses_without_a_closed_form_keep_the_general_path(
    label: str, loss_fn: nn.Module, kind: str, shape: tuple, structure: str
) -> None:
    case = Case(kind, "mean", 5, shape, seed=7)
    if label == "rate input":
        case.model = nn.Sequential(case.model, nn.Softplus())
    if label == "log-softmax NLL":
        case.model = nn.Sequential(case.model, nn.LogSoftmax(-1))
    case.loss_fn = loss_fn
    outputs = case.model(case.inputs).detach()
    assert output_hessian_roots(loss_fn, outputs, case.targets) is None
    expected = in_structure(case.oracle(), structure, case.model)
    assert_close(case.ggn(structure), expected)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("structure", MATRIX_STRUCTURES)
def test_an_ignored_class_keeps_the_general_path(reduction: str, structure: str) -> None:
    case = Case("cross_entropy", reduction, 6, (3,), seed=2)
    case.targets[1] = -100
    outputs = case.model(case.inputs).detach()
    assert output_hessian_roots(case.loss_fn, outputs, case.targets) is None
    expected = in_structure(case.oracle(), structure, case.model)
    assert_close(case.ggn(structure), expected)


def test_a_declared_scale_that_contradicts_the_reduction_is_still_refused() -> None:
    case = Case("cross_entropy", "mean", 4, (3,), seed=1)
    with pytest.raises(ValueError, match="declared separable with scale 1"):
        case.ggn("dense", separable="sum")


def test_broadcast_targets_keep_the_general_path() -> None:
    """``MSELoss`` on outputs ``(N, 1)`` and targets ``(N,)`` broadcasts to ``(N, N)``."""
    case = Case("mse", "mean", 4, (1,), seed=3)
    case.targets = case.targets.reshape(-1)
    outputs = case.model(case.inputs).detach()
    assert output_hessian_roots(case.loss_fn, outputs, case.targets) is None
    with pytest.warns(UserWarning, match="broadcasting"):
        assert_close(case.ggn("dense"), case.oracle())


def test_negative_probability_targets_are_still_refused_by_kfac() -> None:
    """Targets summing below zero make the loss concave in the logits there."""
    case = Case("probabilities", "mean", 4, (3,), seed=4)
    case.targets = -case.targets
    outputs = case.model(case.inputs).detach()
    assert output_hessian_roots(case.loss_fn, outputs, case.targets) is None
    with pytest.raises(ValueError, match="convex in the outputs"):
        case.ggn("kfac")
