"""The K-FAC and EKFAC curvature operators on a layer called several times in one forward pass
(weight sharing across calls; models in ``tests/repeated_calls.py``): the calls' locations are
pooled as one call's.

Oracles: the siamese network against its stacked twin (one call on two locations per sample)
for every Fisher kind; the unrolled cell's factors against brute force and its EKFAC
eigenvalues against per-sample gradients from ``torch.func``; the preconditioners
(``natgrad.optim``, tested against the same oracles) against the operators' solves.
"""

import pytest
import torch
from torch import nn

from natgrad.curvature.ekfac import build_ekfac
from natgrad.curvature.kfac import build_kfac
from natgrad.optim import EKFAC, KFAC
from repeated_calls import (
    DTYPE,
    TwiceConv,
    segments_pair,
    siamese_batch,
    siamese_pair,
    unrolled_batch,
    unrolled_calls,
    unrolled_cell_gradients,
)

BUILDERS = [pytest.param(build_kfac, id="kfac"), pytest.param(build_ekfac, id="ekfac")]


def fisher_options(kind: str, targets: torch.Tensor) -> dict:
    options = {"likelihood": "categorical", "kind": kind}
    if kind == "empirical":
        options["targets"] = targets
    if kind == "mc":
        options |= {"mc_samples": 3, "generator": torch.Generator().manual_seed(0)}
    return options


@pytest.mark.parametrize("build", BUILDERS)
@pytest.mark.parametrize("kind", ["exact", "mc", "empirical"])
def test_calls_pool_like_locations_of_one_call(build, kind: str) -> None:
    model, twin = siamese_pair()
    inputs, targets = siamese_batch()
    operator = build(model, inputs, **fisher_options(kind, targets))
    reference = build(twin, inputs, **fisher_options(kind, targets))
    torch.testing.assert_close(operator.to_dense(), reference.to_dense())


@pytest.mark.parametrize("build", BUILDERS)
def test_calls_with_different_numbers_of_locations_pool_them(build) -> None:
    """``A`` weighs each call by its locations: 2 and 3 tokens pool as one call on 5."""
    model, twin, inputs, targets = segments_pair()
    options = fisher_options("exact", targets)
    torch.testing.assert_close(
        build(model, inputs, **options).to_dense(), build(twin, inputs, **options).to_dense()
    )


@pytest.mark.parametrize("build", BUILDERS)
def test_reduce_reduces_within_each_call_and_pools_the_calls(build) -> None:
    """Each call of the siamese ``lin`` has one location, so reduce pools the calls as expand
    pools the stack's two locations (reducing the stack would average them)."""
    model, twin = siamese_pair()
    inputs, targets = siamese_batch()
    options = fisher_options("exact", targets)
    reduced = build(model, inputs, kfac_approx="reduce", **options).to_dense()
    torch.testing.assert_close(reduced, build(twin, inputs, **options).to_dense())
    stack_reduced = build(twin, inputs, kfac_approx="reduce", **options).to_dense()
    assert not torch.allclose(reduced, stack_reduced)


def test_unrolled_cell_factors_against_brute_force() -> None:
    model, inputs, targets = unrolled_batch(1)
    features, grads = unrolled_calls(model, inputs, targets)
    operator = build_kfac(model, inputs, **fisher_options("empirical", targets))
    rows, grad_rows = features.reshape(-1, 4), grads.reshape(-1, 3)
    torch.testing.assert_close(operator.input_factors[0], rows.T @ rows / 14)
    torch.testing.assert_close(operator.output_factors[0], grad_rows.T @ grad_rows / 7)


def test_unrolled_cell_ekfac_eigenvalues_from_per_sample_gradients() -> None:
    model, inputs, targets = unrolled_batch(2)
    gradients = unrolled_cell_gradients(model, inputs, targets)
    operator = build_ekfac(model, inputs, **fisher_options("empirical", targets))
    output_eigen, input_eigen = operator.eigenbases[0]
    coordinates = output_eigen.vectors.T @ gradients @ input_eigen.vectors
    torch.testing.assert_close(operator.eigenvalues[0], coordinates.square().mean(0))


def grouped_twice_conv() -> tuple[TwiceConv, torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=2).to(DTYPE)
    model = TwiceConv(conv, nn.Linear(4 * 16, 3).to(DTYPE))
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(24, 4, 4, 4, generator=generator, dtype=DTYPE)
    return model, inputs, torch.randint(0, 3, (24,), generator=generator)


@pytest.mark.parametrize(
    ("cls", "build", "make"),
    [
        pytest.param(KFAC, build_kfac, lambda: unrolled_batch(4), id="kfac-unrolled"),
        pytest.param(EKFAC, build_ekfac, lambda: unrolled_batch(4), id="ekfac-unrolled"),
        pytest.param(KFAC, build_kfac, grouped_twice_conv, id="kfac-grouped-conv"),
        pytest.param(EKFAC, build_ekfac, grouped_twice_conv, id="ekfac-grouped-conv"),
    ],
)
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_preconditioner_step_solves_with_the_operator(cls, build, make, kfac_approx) -> None:
    model, inputs, targets = make()
    options = {"inv_update_interval": 1, "damping": 0.1, "kfac_approx": kfac_approx}
    precond = cls(model, factor_decay=0.0, **options)
    nn.functional.cross_entropy(model(inputs), targets).backward()
    gradient = torch.cat([param.grad.reshape(-1) for param in model.parameters()])
    precond.step()
    operator = build(model, inputs, kfac_approx=kfac_approx, **fisher_options("empirical", targets))
    step = torch.cat([param.grad.reshape(-1) for param in model.parameters()])
    torch.testing.assert_close(step, operator.solve(gradient, 0.1))


def test_calls_off_the_batch_raise_naming_the_layer() -> None:
    """A call on part of the batch, or on a sequence-first input, is refused."""

    class Halves(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.lin(inputs) + self.lin(inputs.flip(0)[:1]).expand(len(inputs), 2)

    class SequenceFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:  # (N, T, 3)
            return self.lin(inputs.transpose(0, 1)).mean(0)

    with pytest.raises(ValueError, match=r"'lin'.*shape \(1, 3\).*batch's 4 samples"):
        build_kfac(Halves(), torch.randn(4, 3), likelihood="gaussian")
    with pytest.raises(ValueError, match=r"'lin'.*shape \(5, 4, 3\).*batch_first"):
        build_ekfac(SequenceFirst(), torch.randn(4, 5, 3), likelihood="gaussian")
