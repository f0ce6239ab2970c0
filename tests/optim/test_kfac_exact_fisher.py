"""``fisher_type="exact"`` and ``mc_samples``: the preconditioners back-propagate the ``C``
columns of ``∇²A(f)^{1/2}`` (or several sampled gradients) in turn, as the curvature operators'
``kind="exact"`` (``"mc"``) does; their steps must equal the operators' solves, also where a
layer is called several times (the vectors' pairs stay apart in EKFAC, the samples counted
once) and for every likelihood."""

import pytest
import torch
from test_kfac_optim import (
    DTYPE,
    INPUT_SHAPES,
    _SequenceClassifier,
    conv1d_net,
    convnet,
    flat_grads,
    grouped_convnet,
    mlp,
)
from torch import nn

from natgrad.curvature.ekfac import build_ekfac
from natgrad.curvature.kfac import build_kfac
from natgrad.optim import EKFAC, KFAC
from repeated_calls import siamese_batch, siamese_pair

LOSSES = {
    "categorical": lambda outputs, targets: nn.functional.cross_entropy(outputs, targets),
    "gaussian": lambda outputs, targets: 0.5 * (outputs - targets).square().sum(1).mean(),
    "bernoulli": lambda outputs, targets: (
        nn.functional.binary_cross_entropy_with_logits(outputs, targets, reduction="sum")
        / len(outputs)
    ),
    "poisson": lambda outputs, targets: (
        nn.functional.poisson_nll_loss(outputs, targets, reduction="sum") / len(outputs)
    ),
}


def one_batch_step(preconditioner, model, inputs, targets, likelihood: str, **options) -> tuple:
    """One step (by default with the exact Fisher) on one batch, with the factors of that batch
    alone and fresh inverses: the gradient before, and the preconditioner."""
    options = {"fisher_type": "exact", "factor_decay": 0.0, "inv_update_interval": 1} | options
    precond = preconditioner(model, likelihood=likelihood, damping=0.1, **options)
    model.zero_grad()
    outputs = model(inputs)
    precond.sample_backward(outputs)
    LOSSES[likelihood](outputs, targets).backward()
    gradient = flat_grads(model)
    precond.step()
    return gradient, precond


def targets_for(likelihood: str, samples: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    if likelihood == "categorical":
        return torch.randint(0, 3, (samples,), generator=generator)
    if likelihood == "gaussian":
        return torch.randn(samples, 3, generator=generator, dtype=DTYPE)
    return torch.randint(0, 2, (samples, 3), generator=generator).to(DTYPE)


@pytest.mark.parametrize("likelihood", list(LOSSES))
@pytest.mark.parametrize("make_model", [mlp, convnet, conv1d_net, grouped_convnet])
@pytest.mark.parametrize("damping_mode", ["eigen", "factored"])
def test_kfac_step_is_the_exact_operator_solve(make_model, damping_mode, likelihood) -> None:
    torch.manual_seed(1)
    model = make_model()
    inputs = torch.randn(6, *INPUT_SHAPES[make_model], dtype=DTYPE)
    targets = targets_for(likelihood, 6)
    gradient, _ = one_batch_step(
        KFAC, model, inputs, targets, likelihood, damping_mode=damping_mode
    )
    operator = build_kfac(model, inputs, likelihood=likelihood, kind="exact")
    solve = operator.solve if damping_mode == "eigen" else operator.solve_factored
    torch.testing.assert_close(flat_grads(model), solve(gradient, 0.1))


def unpadded_convnet() -> nn.Module:
    """Unpadded, so that the kernel offsets average different windows: otherwise reduce's
    ``A`` is singular and EKFAC's eigenvalues in its null space depend on the eigensolver."""
    model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 9, 3))
    return model.to(DTYPE)


EKFAC_INPUTS = {mlp: (3,), unpadded_convnet: (1, 4, 4), _SequenceClassifier: (5, 3)}


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("make_model", list(EKFAC_INPUTS))
def test_ekfac_step_is_the_exact_operator_solve(make_model, kfac_approx: str) -> None:
    """EKFAC's eigenvalues square each column's per-sample gradient apart and add them."""
    torch.manual_seed(2)
    model = make_model()
    inputs = torch.randn(7, *EKFAC_INPUTS[make_model], dtype=DTYPE)
    targets = targets_for("categorical", 7) % 2  # the sequence classifier has two classes
    options = {"kfac_approx": kfac_approx}
    gradient, _ = one_batch_step(EKFAC, model, inputs, targets, "categorical", **options)
    operator = build_ekfac(model, inputs, likelihood="categorical", kind="exact", **options)
    torch.testing.assert_close(flat_grads(model), operator.solve(gradient, 0.1))


@pytest.mark.parametrize("preconditioner", [KFAC, EKFAC])
def test_a_layer_called_twice_pools_its_calls_per_column(preconditioner) -> None:
    """The siamese ``lin`` is called twice per sample: its calls pool within each column's
    backward pass, as for the stacked twin that calls it once on both inputs."""
    model, twin = siamese_pair(3)
    inputs, targets = siamese_batch(seed=3)
    steps = [
        one_batch_step(preconditioner, network, inputs, targets, "categorical")
        for network in (model, twin)
    ]
    for _, precond in steps:  # the factors took the statistics: none are pending
        assert all(state.output_count == 0 for state in precond.layers)
    torch.testing.assert_close(flat_grads(model), flat_grads(twin))
    ekfac = build_ekfac(twin, inputs, likelihood="categorical", kind="exact")
    kfac = build_kfac(twin, inputs, likelihood="categorical", kind="exact")
    operator = ekfac if preconditioner is EKFAC else kfac
    torch.testing.assert_close(flat_grads(model), operator.solve(steps[0][0], 0.1))


def test_a_step_without_the_exact_backward_is_refused() -> None:
    model = mlp()
    precond = KFAC(model, fisher_type="exact", likelihood="categorical", damping=0.1)
    model.zero_grad()
    nn.functional.cross_entropy(
        model(torch.randn(4, 3, dtype=DTYPE)), torch.zeros(4).long()
    ).backward()
    with pytest.raises(RuntimeError, match="fisher_type='exact' records its statistics"):
        precond.step()
    with pytest.raises(ValueError, match="needs a likelihood"):
        KFAC(mlp(), fisher_type="exact")


@pytest.mark.parametrize("preconditioner", [KFAC, EKFAC])
def test_several_monte_carlo_draws_equal_the_operator_with_as_many(preconditioner) -> None:
    """``mc_samples`` draws per recording step, in the operators' order (one draw for the whole
    batch after another, from the same generator): the step is the operator's solve."""
    torch.manual_seed(4)
    model = mlp()
    inputs, targets = torch.randn(6, 3, dtype=DTYPE), targets_for("categorical", 6)
    sampling = {"fisher_type": "mc", "mc_samples": 3, "generator": torch.Generator().manual_seed(9)}
    gradient, _ = one_batch_step(preconditioner, model, inputs, targets, "categorical", **sampling)
    build = build_ekfac if preconditioner is EKFAC else build_kfac
    operator = build(
        model,
        inputs,
        likelihood="categorical",
        kind="mc",
        mc_samples=3,
        generator=torch.Generator().manual_seed(9),
    )
    torch.testing.assert_close(flat_grads(model), operator.solve(gradient, 0.1))
    with pytest.raises(ValueError, match="mc_samples"):
        KFAC(mlp(), fisher_type="mc", likelihood="categorical", mc_samples=0)
