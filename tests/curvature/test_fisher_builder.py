"""natgrad.fisher in the dense/diag/block/implicit structures against float64 brute force."""

import pytest
import torch
from brute_force import (
    DTYPE,
    LIKELIHOOD_NAMES,
    FlatModel,
    block_diagonal,
    exact_fisher,
    gradient_fisher,
    mc_fisher,
    mc_tolerance,
    relative_error,
    tiny_data,
    tiny_mlp,
)
from torch import nn

from natgrad.curvature import (
    BlockDiagonal,
    Dense,
    Diagonal,
    Implicit,
    fisher,
    get_likelihood,
)

STRUCTURES = ("dense", "diag", "block", "implicit")
OPERATOR_TYPES = {"dense": Dense, "diag": Diagonal, "block": BlockDiagonal, "implicit": Implicit}


def assert_structure_matches(operator, reference: torch.Tensor, structure: str, slices) -> None:
    """The operator equals the reference, its diagonal, or its per-parameter blocks."""
    assert isinstance(operator, OPERATOR_TYPES[structure])
    assert operator.dtype == DTYPE
    tolerance = {"atol": 1e-12, "rtol": 1e-9}
    if structure in ("dense", "implicit"):
        torch.testing.assert_close(operator.to_dense(), reference, **tolerance)
    elif structure == "diag":
        torch.testing.assert_close(operator.diag(), reference.diagonal(), **tolerance)
        torch.testing.assert_close(operator.to_dense(), torch.diag(reference.diagonal()))
    else:
        expected = torch.block_diag(*block_diagonal(reference, slices))
        torch.testing.assert_close(operator.to_dense(), expected, **tolerance)


@pytest.mark.parametrize("likelihood", LIKELIHOOD_NAMES)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_exact_fisher_matches_brute_force(likelihood: str, structure: str) -> None:
    model = tiny_mlp()
    inputs, _ = tiny_data(likelihood)
    reference = exact_fisher(model, inputs, likelihood)
    operator = fisher(model, inputs, likelihood=likelihood, structure=structure)
    assert_structure_matches(operator, reference, structure, FlatModel(model).block_slices())


@pytest.mark.parametrize("likelihood", LIKELIHOOD_NAMES)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_empirical_fisher_matches_brute_force(likelihood: str, structure: str) -> None:
    model = tiny_mlp()
    inputs, targets = tiny_data(likelihood)
    reference = gradient_fisher(model, inputs, likelihood, targets)
    operator = fisher(
        model, inputs, likelihood=likelihood, kind="empirical", structure=structure, targets=targets
    )
    assert_structure_matches(operator, reference, structure, FlatModel(model).block_slices())


def draw_targets(model, inputs, likelihood: str, samples: int, seed: int) -> list[torch.Tensor]:
    """The draws ``fisher(kind="mc")`` documents: ``samples`` calls of ``sample`` in turn."""
    generator = torch.Generator().manual_seed(seed)
    outputs = model(inputs).detach()
    return [get_likelihood(likelihood).sample(outputs, generator) for _ in range(samples)]


@pytest.mark.parametrize("likelihood", LIKELIHOOD_NAMES)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_mc_fisher_matches_brute_force_for_same_draws(likelihood: str, structure: str) -> None:
    model = tiny_mlp()
    inputs, _ = tiny_data(likelihood)
    draws = draw_targets(model, inputs, likelihood, samples=3, seed=7)
    reference = mc_fisher(model, inputs, likelihood, draws)
    generator = torch.Generator().manual_seed(7)
    operator = fisher(
        model,
        inputs,
        likelihood=likelihood,
        kind="mc",
        structure=structure,
        mc_samples=3,
        generator=generator,
    )
    assert_structure_matches(operator, reference, structure, FlatModel(model).block_slices())


def test_mc_fisher_is_reproducible_with_a_seed() -> None:
    model = tiny_mlp()
    inputs, _ = tiny_data("categorical")

    def build(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return fisher(model, inputs, kind="mc", mc_samples=2, generator=generator).to_dense()

    torch.testing.assert_close(build(3), build(3), rtol=0, atol=0)
    assert not torch.equal(build(3), build(4))


@pytest.mark.parametrize("likelihood", LIKELIHOOD_NAMES)
def test_mc_fisher_converges_to_exact(likelihood: str) -> None:
    model = tiny_mlp()
    inputs, _ = tiny_data(likelihood)
    exact = exact_fisher(model, inputs, likelihood)
    errors = {}
    for samples in (4, 1600):
        generator = torch.Generator().manual_seed(11)
        estimate = fisher(
            model, inputs, likelihood=likelihood, kind="mc", mc_samples=samples, generator=generator
        ).to_dense()
        errors[samples] = relative_error(estimate, exact)
    assert errors[1600] < mc_tolerance(1600)
    assert errors[1600] < errors[4]


def test_frozen_parameters_are_excluded() -> None:
    model = tiny_mlp()
    full = exact_fisher(model, tiny_data("categorical")[0], "categorical")
    model[0].bias.requires_grad_(False)
    inputs, _ = tiny_data("categorical")
    operator = fisher(model, inputs)
    kept = torch.cat([torch.arange(0, 12), torch.arange(16, 31)])
    assert operator.shape == (27, 27)
    assert [tuple(s) for s in operator.param_shapes] == [(4, 3), (3, 4), (3,)]
    torch.testing.assert_close(operator.to_dense(), full[kept][:, kept])


def test_scalar_output_model_and_float32_dtype() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    inputs = torch.randn(6, 3)
    squeezed = nn.Sequential(model, nn.Flatten(0))
    operator = fisher(squeezed, inputs, likelihood="bernoulli")
    assert operator.dtype == torch.float32
    probabilities = torch.sigmoid(squeezed(inputs)).detach()
    weights = probabilities * (1 - probabilities)
    design = torch.cat([inputs, torch.ones(6, 1)], dim=1)
    expected = design.T @ (weights[:, None] * design) / 6
    torch.testing.assert_close(operator.to_dense(), expected, rtol=1e-5, atol=1e-6)


def test_many_samples_are_chunked_consistently() -> None:
    model = tiny_mlp()
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(70, 3, generator=generator, dtype=DTYPE)
    reference = exact_fisher(model, inputs, "categorical")
    for structure in ("dense", "diag"):
        operator = fisher(model, inputs, structure=structure)
        expected = reference if structure == "dense" else torch.diag(reference.diagonal())
        torch.testing.assert_close(operator.to_dense(), expected)


@pytest.mark.parametrize("structure", ("kfac", "ekfac"))
def test_kronecker_structures_are_forwarded(structure: str) -> None:
    from natgrad.curvature.ekfac import build_ekfac
    from natgrad.curvature.kfac import build_kfac

    build = build_kfac if structure == "kfac" else build_ekfac
    model = tiny_mlp()
    inputs, _ = tiny_data("categorical")
    operator = fisher(model, inputs, structure=structure)
    expected = build(model, inputs, likelihood="categorical", kind="exact")
    assert type(operator) is type(expected)
    torch.testing.assert_close(operator.to_dense(), expected.to_dense())


def test_fisher_is_the_mean_not_the_sum() -> None:
    model = tiny_mlp()
    inputs, _ = tiny_data("gaussian")
    once = fisher(model, inputs, likelihood="gaussian").to_dense()
    twice = fisher(model, torch.cat([inputs, inputs]), likelihood="gaussian").to_dense()
    torch.testing.assert_close(once, twice)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_convolutional_model_matches_brute_force(structure: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, kernel_size=3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)
    ).to(DTYPE)
    inputs = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    reference = exact_fisher(model, inputs, "categorical")
    operator = fisher(model, inputs, structure=structure)
    assert_structure_matches(operator, reference, structure, FlatModel(model).block_slices())


def test_integer_inputs_reach_an_embedding() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 2), nn.Linear(2, 3)).to(DTYPE)
    tokens = torch.tensor([0, 3, 5, 3])
    reference = exact_fisher(model, tokens, "categorical")
    torch.testing.assert_close(fisher(model, tokens).to_dense(), reference)
