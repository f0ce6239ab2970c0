"""Builders on models whose outputs the likelihood cannot describe: a clear error, never NaN."""

import pytest
import torch
from brute_force import DTYPE, exact_fisher, relative_error
from torch import Tensor, nn

import natgrad

STRUCTURES = ("dense", "block", "implicit", "diag")


class LogOfLinear(nn.Module):
    """``log(W x + b)``: NaN outputs wherever ``W x + b < 0``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, inputs: Tensor) -> Tensor:
        return torch.log(self.linear(inputs))


class Shifted(nn.Module):
    """A linear layer plus a constant ``shift`` buffer added to the outputs."""

    def __init__(self, shift: Tensor) -> None:
        super().__init__()
        self.linear = nn.Linear(3, len(shift))
        self.register_buffer("shift", shift)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.linear(inputs) + self.shift


def inputs(samples: int = 6) -> Tensor:
    return torch.randn(samples, 3, generator=torch.Generator().manual_seed(0), dtype=DTYPE)


def nan_model() -> nn.Module:
    torch.manual_seed(0)
    model = LogOfLinear().to(DTYPE)
    with torch.no_grad():
        model.linear.bias.copy_(torch.tensor([5.0, -5.0]))
    return model


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "poisson"])
def test_exact_fisher_of_nan_outputs_raises(likelihood: str, structure: str) -> None:
    with pytest.raises(ValueError, match=rf"exact Fisher of the {likelihood}.*sample 0.*nan"):
        natgrad.fisher(nan_model(), inputs(), likelihood=likelihood, structure=structure)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_empirical_fisher_of_nan_outputs_raises(structure: str) -> None:
    targets = torch.zeros(6, 2, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"empirical Fisher of the gaussian.*sample 0"):
        natgrad.fisher(nan_model(), inputs(), "gaussian", "empirical", structure, targets=targets)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_mc_fisher_of_nan_outputs_raises(structure: str) -> None:
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="categorical likelihood: cannot sample"):
        natgrad.fisher(nan_model(), inputs(), "categorical", "mc", structure, generator=generator)


@pytest.mark.parametrize("structure", ["dense", "block"])
def test_float32_overflow_of_the_poisson_fisher_raises(structure: str) -> None:
    torch.manual_seed(0)
    model = Shifted(torch.full((2,), 89.0))  # rates e^89 > float32 max, their roots not
    with pytest.raises(ValueError, match="must not contain infs or NaNs"):
        natgrad.fisher(model, inputs().float(), "poisson", structure=structure)


@pytest.mark.parametrize("structure", ["dense", "block"])
def test_hessian_of_a_model_with_nan_derivatives_raises(structure: str) -> None:
    class SquareRoot(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(3, dtype=DTYPE))

        def forward(self, batch: Tensor) -> Tensor:
            return (batch * self.weight).sum(-1, keepdim=True).sqrt()

    targets = torch.zeros(6, 1, dtype=DTYPE)
    with pytest.raises(ValueError, match="must not contain infs or NaNs"):
        natgrad.hessian(SquareRoot(), inputs(), nn.MSELoss(), targets, structure=structure)


@pytest.mark.parametrize("outputs", [1, None])
def test_categorical_fisher_of_a_single_logit_model_raises(outputs: int | None) -> None:
    torch.manual_seed(0)
    layers = [nn.Linear(3, 1)] + ([] if outputs else [nn.Flatten(0)])
    model = nn.Sequential(*layers).to(DTYPE)
    with pytest.raises(ValueError, match=r"C >= 2 logits.*bernoulli"):
        natgrad.fisher(model, inputs(), likelihood="categorical")


@pytest.mark.parametrize("kind", ["exact", "mc", "empirical"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_masked_logits_of_minus_infinity_are_still_accepted(kind: str, structure: str) -> None:
    torch.manual_seed(0)
    model = Shifted(torch.tensor([0.0, float("-inf"), 0.0], dtype=DTYPE)).to(DTYPE)
    targets = torch.tensor([0, 2, 0, 2, 2, 0])
    built = natgrad.fisher(
        model,
        inputs(),
        "categorical",
        kind,
        structure,
        targets=targets,
        generator=torch.Generator().manual_seed(0),
    )
    assert bool(torch.isfinite(built.to_dense()).all())
    if kind == "exact":
        expected = exact_fisher(model, inputs(), "categorical").diagonal()
        assert relative_error(built.diag(), expected) < 1e-12
