"""``cg_rtol`` and ``cg_max_iter`` of ``fisher``, ``ggn`` and ``hessian`` with
``structure="implicit"``: passed to the operator, checked at the builder (the offending value
named), refused with other structures; a looser tolerance takes fewer CG iterations and leaves
a larger residual, a tighter one a residual below it, against the float64 dense matrix."""

import warnings

import pytest
import torch
from brute_force import DTYPE, tiny_data, tiny_mlp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from natgrad.curvature import Implicit, fisher, ggn, hessian
from natgrad.curvature.implicit import default_cg_rtol

BUILDERS = ("fisher", "ggn", "hessian")
DAMPING = {"fisher": 1e-3, "ggn": 1e-3, "hessian": 5.0}  # the Hessian may be indefinite


def build(builder: str, structure: str = "implicit", **options):
    model = tiny_mlp()
    inputs, targets = tiny_data("categorical")
    if builder == "fisher":
        return fisher(model, inputs, structure=structure, **options)
    make = ggn if builder == "ggn" else hessian
    return make(model, inputs, nn.CrossEntropyLoss(), targets, structure=structure, **options)


@pytest.fixture(scope="module")
def dense_matrices() -> dict[str, torch.Tensor]:
    return {builder: build(builder, "dense").to_dense() for builder in BUILDERS}


@pytest.mark.parametrize("builder", BUILDERS)
def test_the_options_reach_the_operator_and_default_as_before(builder: str) -> None:
    operator = build(builder, cg_rtol=1e-4, cg_max_iter=7)
    assert isinstance(operator, Implicit)
    assert (operator.cg_rtol, operator.cg_max_iter) == (1e-4, 7)
    default = build(builder)
    assert default.cg_rtol == default_cg_rtol(DTYPE)
    assert default.cg_max_iter == min(10 * default.shape[0], 1000)


@pytest.mark.parametrize("builder", BUILDERS)
@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"cg_rtol": 0.0}, ValueError, r"cg_rtol must be a number in \(0, 1\), got 0\.0"),
        ({"cg_rtol": -1e-3}, ValueError, r"cg_rtol .* got -0\.001"),
        ({"cg_rtol": float("nan")}, ValueError, r"cg_rtol .* got nan"),
        ({"cg_rtol": float("inf")}, ValueError, r"cg_rtol .* got inf"),
        ({"cg_rtol": 1.0}, ValueError, r"cg_rtol .* got 1\.0"),
        ({"cg_rtol": "1e-3"}, TypeError, r"cg_rtol must be a real number, got '1e-3'"),
        ({"cg_max_iter": 0}, ValueError, r"cg_max_iter must be a positive integer, got 0"),
        ({"cg_max_iter": 2.5}, TypeError, r"cg_max_iter must be an integer, got 2\.5"),
        ({"cg_max_iter": True}, TypeError, r"cg_max_iter must be an integer, got True"),
    ],
)
def test_bad_options_are_refused_naming_the_value(builder, options, error, message) -> None:
    with pytest.raises(error, match=message):
        build(builder, **options)


@pytest.mark.parametrize("builder", BUILDERS)
@pytest.mark.parametrize("structure", ["dense", "diag", "block"])
def test_the_options_are_refused_with_another_structure(builder: str, structure: str) -> None:
    for options in ({"cg_rtol": 1e-3}, {"cg_max_iter": 5}):
        with pytest.raises(ValueError, match=f"applies to structure='implicit'.*'{structure}'"):
            build(builder, structure, **options)


def test_the_options_set_on_an_operator_are_checked() -> None:
    operator = build("fisher")
    with pytest.raises(ValueError, match=r"cg_rtol .* got nan"):
        operator.cg_rtol = float("nan")
    with pytest.raises(ValueError, match=r"cg_max_iter .* got -1"):
        operator.cg_max_iter = -1
    operator.cg_rtol, operator.cg_max_iter = 0.5, 3
    operator.cg_rtol = operator.cg_max_iter = None
    assert operator.cg_rtol == default_cg_rtol(DTYPE) and operator.cg_max_iter == 310


def relative_residual(matrix: torch.Tensor, damping: float, x: torch.Tensor, b: torch.Tensor):
    residual = matrix @ x + damping * x - b
    return float(torch.linalg.vector_norm(residual) / torch.linalg.vector_norm(b))


@settings(max_examples=6, deadline=None)
@given(builder=st.sampled_from(BUILDERS), seed=st.integers(0, 2**16))
def test_a_looser_tolerance_takes_fewer_iterations_and_a_tighter_one_meets_it(
    dense_matrices, builder: str, seed: int
) -> None:
    matrix, damping = dense_matrices[builder], DAMPING[builder]
    size = matrix.shape[0]
    rhs = torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    results = {}
    for rtol in (1e-2, 1e-10):
        operator = build(builder, cg_rtol=rtol)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # both converge
            solution = operator.solve(rhs, damping)
        results[rtol] = (solution, operator.last_cg_info)
        assert operator.last_cg_info.converged
        assert relative_residual(matrix, damping, solution, rhs) <= rtol * (1 + 1e-3)
    (loose, loose_info), (tight, tight_info) = results[1e-2], results[1e-10]
    assert loose_info.iterations < tight_info.iterations
    assert relative_residual(matrix, damping, tight, rhs) < relative_residual(
        matrix, damping, loose, rhs
    )
    oracle = torch.linalg.solve(matrix + damping * torch.eye(size, dtype=DTYPE), rhs)
    error = torch.linalg.vector_norm(tight - oracle) / torch.linalg.vector_norm(oracle)
    assert float(error) <= 1e-6


def test_an_iteration_cap_stops_the_solve_and_warns(dense_matrices) -> None:
    operator = build("fisher", cg_max_iter=2)
    rhs = torch.ones(operator.shape[0], dtype=DTYPE)
    with pytest.warns(RuntimeWarning, match="stopped after 2 iterations"):
        operator.solve(rhs, 1e-3)
    assert operator.last_cg_info.iterations == 2 and not operator.last_cg_info.converged
