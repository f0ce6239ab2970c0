"""``ggn(..., structure="kfac"/"ekfac"/"diag")`` from the square roots of the per-sample output
Hessians of the loss, back-propagated to every layer: Kronecker factors of the generalised
Gauss-Newton matrix, and its diagonal without per-sample Jacobians.

Oracles: for losses that are negative log-likelihoods the GGN is the exact Fisher, so the
operators equal ``fisher(structure="kfac"/"ekfac")`` (built from the likelihood's closed-form
``∇²A``, not from ``torch.func`` Hessians of the loss); at batch size one K-FAC and EKFAC are
exact on each layer's block of a network without weight sharing, checked against the dense
GGN from per-sample Jacobians for the Huber loss, which is no likelihood; the diagonal against
the dense GGN's.
"""

import pytest
import torch
from torch import nn

from natgrad.curvature import builders, fisher, ggn, hessian
from natgrad.curvature.kfac import statistics_for_vectors
from natgrad.curvature.layer_diagonal import layer_diagonal_for_vectors

DTYPE = torch.float64
STRUCTURES = ["kfac", "ekfac"]


def mlp(outputs: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, outputs)).to(DTYPE)


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 16, 3)
    ).to(DTYPE)


def inputs_for(model: nn.Module, samples: int = 6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    shape = (1, 3, 3) if isinstance(model[0], nn.Conv2d) else (4,)
    return torch.randn(samples, *shape, generator=generator, dtype=DTYPE)


LIKELIHOOD_LOSSES = {
    "categorical": (nn.CrossEntropyLoss(), lambda n: torch.randint(0, 3, (n,)), 1.0),
    "bernoulli": (nn.BCEWithLogitsLoss(), lambda n: torch.rand(n, 3, dtype=DTYPE).round(), 1 / 3),
    "poisson": (nn.PoissonNLLLoss(), lambda n: torch.poisson(torch.ones(n, 3, dtype=DTYPE)), 1 / 3),
    "gaussian": (nn.MSELoss(), lambda n: torch.randn(n, 3, dtype=DTYPE), 2 / 3),
}
"""Loss, targets, and the factor relating its GGN to the likelihood's Fisher (an elementwise
mean over the 3 outputs divides by 3; the squared error's Hessian is 2, the Gaussian's 1)."""


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("likelihood", list(LIKELIHOOD_LOSSES))
@pytest.mark.parametrize(("make_model", "kfac_approx"), [(mlp, "expand"), (cnn, "reduce")])
def test_ggn_of_a_negative_log_likelihood_is_its_fisher(
    structure, likelihood, make_model, kfac_approx
) -> None:
    model = make_model()
    inputs = inputs_for(model)
    loss_fn, make_targets, factor = LIKELIHOOD_LOSSES[likelihood]
    targets = make_targets(len(inputs))
    options = {"structure": structure, "kfac_approx": kfac_approx}
    operator = ggn(model, inputs, loss_fn, targets, **options)
    expected = fisher(model, inputs, likelihood, kind="exact", **options)
    torch.testing.assert_close(operator.to_dense(), factor * expected.to_dense())


@pytest.mark.parametrize("structure", STRUCTURES)
def test_a_summed_loss_gives_n_times_the_mean(structure) -> None:
    model = mlp()
    inputs = inputs_for(model)
    targets = torch.randint(0, 3, (len(inputs),))
    mean = ggn(model, inputs, nn.CrossEntropyLoss(), targets, structure=structure)
    total = ggn(model, inputs, nn.CrossEntropyLoss(reduction="sum"), targets, structure=structure)
    torch.testing.assert_close(total.to_dense(), len(inputs) * mean.to_dense())


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("make_model", [mlp, cnn])
def test_exact_on_each_layer_block_at_batch_size_one(structure, make_model) -> None:
    """The Huber loss's GGN (no likelihood's Fisher) against the dense GGN, layer by layer."""
    model = make_model()
    inputs = inputs_for(model, samples=1)
    with torch.no_grad():  # residuals inside and outside the quadratic zone
        targets = model(inputs) + torch.tensor([[0.1, 2.0, -0.2]], dtype=DTYPE)
    loss_fn = nn.HuberLoss(delta=0.5)
    operator = ggn(model, inputs, loss_fn, targets, structure=structure).to_dense()
    dense = ggn(model, inputs, loss_fn, targets).to_dense()
    start = 0
    for module in model:
        if not isinstance(module, nn.Linear | nn.Conv2d):
            continue
        stop = start + module.weight.numel() + module.bias.numel()
        if isinstance(module, nn.Linear):  # a convolution's 16 locations: not exact
            block = slice(start, stop)
            torch.testing.assert_close(operator[block, block], dense[block, block])
        start = stop
    assert dense.abs().max() > 1e-3


def test_kfac_needs_a_separable_convex_loss() -> None:
    model = mlp()
    inputs = inputs_for(model)
    targets = torch.randn(len(inputs), 3, dtype=DTYPE)

    def coupled(outputs, values):
        return (outputs - values).mean(0).square().sum()

    with pytest.raises(ValueError, match="sum or mean of per-sample terms"):
        ggn(model, inputs, coupled, targets, structure="kfac")

    def concave(outputs, values):
        return -(outputs - values).square().mean()

    with pytest.raises(ValueError, match="convex in the outputs"):
        ggn(model, inputs, concave, targets, structure="ekfac", separable="mean")
    with pytest.raises(ValueError, match=r"unknown structure 'kfac'"):
        hessian(model, inputs, nn.MSELoss(), targets, structure="kfac")
    with pytest.raises(ValueError, match="kfac_approx='reduce' applies"):
        ggn(model, inputs, nn.MSELoss(), targets, kfac_approx="reduce")


DIAGONAL_LOSSES = {
    "cross_entropy": (nn.CrossEntropyLoss(), lambda n: torch.randint(0, 3, (n,))),
    "squared_error_sum": (nn.MSELoss(reduction="sum"), lambda n: torch.randn(n, 3, dtype=DTYPE)),
    "huber": (nn.HuberLoss(delta=0.3), lambda n: torch.randn(n, 3, dtype=DTYPE)),
}


@pytest.mark.parametrize("loss_name", list(DIAGONAL_LOSSES))
@pytest.mark.parametrize("make_model", [mlp, cnn])
def test_diagonal_from_the_layers_equals_the_dense_diagonal(
    loss_name, make_model, monkeypatch
) -> None:
    """``structure="diag"`` of a separable convex loss takes the per-layer path (the generic
    assembly from per-sample rows is disabled here) and gives the dense GGN's diagonal."""
    model = make_model()
    inputs = inputs_for(model)
    loss_fn, make_targets = DIAGONAL_LOSSES[loss_name]
    targets = make_targets(len(inputs))
    dense = ggn(model, inputs, loss_fn, targets).to_dense().diagonal()

    def generic(*args, **kwargs):
        raise AssertionError("the generic assembly ran")

    monkeypatch.setattr(builders, "_assembled_sum", generic)
    diagonal = ggn(model, inputs, loss_fn, targets, structure="diag").diag()
    torch.testing.assert_close(diagonal, dense)
    assert dense.abs().max() > 1e-3


def test_a_loss_not_convex_in_the_outputs_takes_the_generic_diagonal() -> None:
    model = mlp()
    inputs = inputs_for(model)
    targets = torch.randn(len(inputs), 3, dtype=DTYPE)

    def mixed(outputs, values):  # convex in one output, concave in another
        residuals = outputs - values
        return (residuals[:, 0].square() - residuals[:, 1].square() + residuals[:, 2]).mean()

    options = {"separable": "mean"}
    diagonal = ggn(model, inputs, mixed, targets, structure="diag", **options).diag()
    dense = ggn(model, inputs, mixed, targets, **options).to_dense().diagonal()
    torch.testing.assert_close(diagonal, dense)
    assert (diagonal < 0).any()


def test_backward_vectors_of_the_wrong_shape_are_named() -> None:
    model = mlp()
    inputs = inputs_for(model, samples=7)

    def vectors(outputs):
        return torch.zeros(2, len(outputs), 4, dtype=DTYPE)

    with pytest.raises(ValueError, match=r"\(K, 7, 3\).*got \(2, 7, 4\)"):
        statistics_for_vectors(model, inputs, vectors)
    with pytest.raises(ValueError, match=r"\(K, 7, 3\).*got \(2, 7, 4\)"):
        layer_diagonal_for_vectors(model, inputs, vectors)
