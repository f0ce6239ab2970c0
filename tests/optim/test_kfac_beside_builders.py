"""natgrad's curvature builders run the model again (under ``torch.func`` transforms, or with
hooks of their own); a K-FAC preconditioner attached to the same model must record none of
those runs. Before, its hooks failed inside the transforms (an in-place sum on a captured
tensor) and took the builders' backward vectors into its statistics outside them."""

import pytest
import torch
from torch import nn

from natgrad import fisher, ggn, hessian
from natgrad.optim import EKFAC, KFAC, NaturalGradient

STRUCTURES = ["dense", "diag", "block", "kfac", "ekfac", "implicit"]


def model_and_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(16, 5, generator=generator, dtype=torch.float64)
    return model, inputs, torch.randint(0, 3, (16,), generator=generator)


def operators(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, structure: str):
    loss = nn.functional.cross_entropy
    built = [
        fisher(model, inputs, structure=structure),
        fisher(model, inputs, structure=structure, kind="empirical", targets=targets),
        ggn(model, inputs, loss, targets, structure=structure, separable="mean"),
    ]
    if structure not in ("kfac", "ekfac"):
        built.append(hessian(model, inputs, loss, targets, structure=structure))
    vector = torch.linspace(-1, 1, built[0].shape[0], dtype=torch.float64)
    return [(operator.to_dense(), operator.mv(vector)) for operator in built]


@pytest.mark.parametrize("preconditioner", [KFAC, EKFAC])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_builders_run_the_model_unseen_by_an_attached_preconditioner(
    preconditioner, structure
) -> None:
    model, inputs, targets = model_and_data()
    reference = operators(model, inputs, targets, structure)
    precond = preconditioner(model, damping=0.1)  # records at every step: hooks attached
    beside = operators(model, inputs, targets, structure)
    for (dense, product), (expected_dense, expected_product) in zip(beside, reference, strict=True):
        torch.testing.assert_close(dense, expected_dense, rtol=0, atol=0)
        torch.testing.assert_close(product, expected_product, rtol=0, atol=0)
    assert all(state.input_count == state.output_count == 0 for state in precond.layers)

    model.zero_grad()
    nn.functional.cross_entropy(model(inputs), targets).backward()
    precond.step()
    features = torch.cat([inputs, torch.ones(16, 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(precond.layers[0].input_factor, features.T @ features / 16)


def test_natural_gradient_beside_a_preconditioner_on_the_same_model() -> None:
    """The natural-gradient optimizer builds its Fisher from the model every step."""
    model, inputs, targets = model_and_data()
    alone, _, _ = model_and_data()
    KFAC(model, damping=0.1)

    def steps(network: nn.Module) -> list[torch.Tensor]:
        optimizer = NaturalGradient(network, "categorical", lr=0.5, damping=0.1)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(network(inputs), targets)
            loss.backward()
            return loss

        for _ in range(3):
            optimizer.step(closure)
        return [param.detach() for param in network.parameters()]

    for param, expected in zip(steps(model), steps(alone), strict=True):
        torch.testing.assert_close(param, expected, rtol=0, atol=0)
