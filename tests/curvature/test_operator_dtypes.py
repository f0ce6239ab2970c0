"""Vectors of another dtype than the operator's: ``mv``, ``solve``, ``@``, ``solve_factored`` and
combinations refuse them (``TypeError`` naming both dtypes, as ``torch.matmul``) instead of
casting a float64 vector to float32 and returning float32; the SciPy export converts arrays that
cast safely to the operator's dtype and refuses wider ones."""

import re

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import cg
from torch import nn

from natgrad.curvature import CurvatureOperator, Diagonal, fisher

STRUCTURES = ("dense", "diag", "block", "kfac", "ekfac", "implicit")


def operators(dtype: torch.dtype) -> dict[str, CurvatureOperator]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)
    inputs = torch.randn(6, 3, generator=torch.Generator().manual_seed(1)).to(dtype)
    built = {
        structure: fisher(model, inputs, likelihood="categorical", structure=structure)
        for structure in STRUCTURES
    }
    built["sum"] = built["kfac"] + 0.5 * built["implicit"]
    return built


NARROW = operators(torch.float32)
WIDE = operators(torch.float64)
NAMES = list(NARROW)
SIZE = NARROW["dense"].shape[0]


def mismatch(given: torch.dtype, operator: torch.dtype) -> str:
    return re.escape(f"dtype {given} but the operator computes in {operator}")


def calls(operator: CurvatureOperator):
    """Every public way of applying ``operator`` to a vector."""
    yield operator.mv
    yield operator.__matmul__
    yield lambda vector: operator.solve(vector, 0.1)
    if hasattr(operator, "solve_factored"):
        yield lambda vector: operator.solve_factored(vector, 0.1)


@pytest.mark.parametrize("name", NAMES)
def test_a_float32_operator_refuses_float64_vectors_blocks_and_lists(name: str) -> None:
    """Before: cast to float32 and returned in float32, the precision lost without a word."""
    operator = NARROW[name]
    vector = torch.randn(SIZE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for apply in calls(operator):
        with pytest.raises(TypeError, match=mismatch(torch.float64, torch.float32)):
            apply(vector)
        with pytest.raises(TypeError, match=mismatch(torch.float64, torch.float32)):
            apply(vector.reshape(-1, 1).repeat(1, 3))
        parts = operator.unflatten(vector.float())
        parts[1] = parts[1].double()
        with pytest.raises(
            TypeError, match="parameter 1 has " + mismatch(torch.float64, torch.float32)
        ):
            apply(parts)
        result = apply(vector.float())
        assert result.dtype == torch.float32 and bool(torch.isfinite(result).all())


@pytest.mark.parametrize("name", NAMES)
def test_a_float64_operator_refuses_float32_and_integer_vectors(name: str) -> None:
    """As ``torch.matmul``: no silent promotion in either direction."""
    operator = WIDE[name]
    for dtype in (torch.float32, torch.int64):
        vector = torch.ones(SIZE, dtype=dtype)
        for apply in calls(operator):
            with pytest.raises(TypeError, match=mismatch(dtype, torch.float64)):
                apply(vector)


@pytest.mark.parametrize("name", NAMES)
def test_the_scipy_export_refuses_wider_arrays_and_converts_narrower_ones(name: str) -> None:
    narrow, wide = NARROW[name].to_scipy(), WIDE[name].to_scipy()
    generator = np.random.default_rng(3)
    vector, block = generator.standard_normal(SIZE), generator.standard_normal((SIZE, 2))
    for array in (vector, block):
        with pytest.raises(
            TypeError, match=re.escape("dtype float64 but the operator computes in float32")
        ):
            narrow @ array
        converted = wide @ array.astype(np.float32)
        assert converted.dtype == np.float64
        exact = WIDE[name].to_dense().numpy() @ array.astype(np.float32).astype(np.float64)
        np.testing.assert_allclose(converted, exact, rtol=1e-10, atol=1e-13)
        product = narrow @ array.astype(np.float32)
        assert product.dtype == np.float32
        np.testing.assert_allclose(product, exact, rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="infs or NaNs"):
        narrow @ np.full(SIZE, np.nan, dtype=np.float32)


def test_scipy_cg_solves_a_float32_operator_in_float32() -> None:
    """SciPy's solvers pass the operator's dtype when the right-hand side has it."""
    damped = NARROW["kfac"] + Diagonal(torch.full((SIZE,), 0.1), NARROW["kfac"].param_shapes)
    rhs = np.random.default_rng(4).standard_normal(SIZE).astype(np.float32)
    solution, info = cg(damped.to_scipy(), rhs, rtol=1e-6)
    assert info == 0 and solution.dtype == np.float32
    dense = WIDE["kfac"].to_dense().numpy() + 0.1 * np.eye(SIZE)
    np.testing.assert_allclose(
        solution, np.linalg.solve(dense, rhs.astype(np.float64)), rtol=1e-3, atol=1e-4
    )


def test_the_scipy_export_of_a_bfloat16_operator_names_its_dtype() -> None:
    """NumPy has no bfloat16: the export refuses it by name instead of failing inside torch."""
    operator = Diagonal(torch.ones(SIZE, dtype=torch.bfloat16), NARROW["diag"].param_shapes)
    with pytest.raises(TypeError, match=r"torch\.bfloat16.*build the operator in float32"):
        operator.to_scipy()
