"""Sums and non-negative multiples of curvature operators, their transpose and their SciPy
export, against float64 dense oracles: ``(c₁ C₁ + c₂ C₂) v``, its diagonal, trace, dense matrix
and damped solve equal those of ``c₁ D₁ + c₂ D₂`` for the dense matrices ``Dᵢ``; SciPy's
``eigsh`` of the export finds the dense matrix's top eigenvalues."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse.linalg import eigsh
from torch import nn

from natgrad.curvature import Dense, Diagonal, fisher
from natgrad.curvature.combination import LinearCombination

STRUCTURES = ["dense", "diag", "block", "kfac", "ekfac", "implicit"]


def model_and_inputs() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    return model, torch.randn(6, 3, dtype=torch.float64)


def operators() -> dict:
    model, inputs = model_and_inputs()
    return {
        structure: fisher(model, inputs, likelihood="categorical", structure=structure)
        for structure in STRUCTURES
    }


OPERATORS = operators()


def vector(seed: int) -> torch.Tensor:
    size = OPERATORS["dense"].shape[0]
    return torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@settings(max_examples=20, deadline=None)
@given(
    first=st.sampled_from(STRUCTURES),
    second=st.sampled_from(STRUCTURES),
    scale=st.floats(0.0, 10.0),
    other_scale=st.floats(0.0, 10.0),
    damping=st.floats(1e-3, 1.0),
    seed=st.integers(0, 2**16),
)
def test_a_combination_acts_as_the_combination_of_the_dense_matrices(
    first: str, second: str, scale: float, other_scale: float, damping: float, seed: int
) -> None:
    combined = scale * OPERATORS[first] + other_scale * OPERATORS[second]
    assert isinstance(combined, LinearCombination)
    dense = scale * OPERATORS[first].to_dense() + other_scale * OPERATORS[second].to_dense()
    v = vector(seed)
    torch.testing.assert_close(combined.mv(v), dense @ v)
    torch.testing.assert_close(combined.diag(), dense.diagonal())
    torch.testing.assert_close(combined.trace(), dense.trace())
    torch.testing.assert_close(combined.to_dense(), dense)
    expected = torch.linalg.solve(dense + damping * torch.eye(len(v), dtype=v.dtype), v)
    torch.testing.assert_close(combined.solve(v, damping), expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_one_scaled_term_is_solved_through_its_own_structure(structure: str, monkeypatch) -> None:
    """``(c C + λI)⁻¹ v = (C + (λ/c) I)⁻¹ (v / c)``: the term's own solve, no CG."""
    operator = OPERATORS[structure]
    calls = []
    original = type(operator)._solve_flat
    monkeypatch.setattr(
        type(operator),
        "_solve_flat",
        lambda self, v, damping: calls.append(damping) or original(self, v, damping),
    )
    v = vector(1)
    scaled = 2.5 * operator
    dense = 2.5 * operator.to_dense() + 0.1 * torch.eye(len(v), dtype=v.dtype)
    torch.testing.assert_close(scaled.solve(v, 0.1), torch.linalg.solve(dense, v))
    assert calls == [pytest.approx(0.04)]


def test_nested_combinations_are_flattened_and_lists_are_accepted() -> None:
    dense, diag = OPERATORS["dense"], OPERATORS["diag"]
    combined = 2 * (dense + 0.5 * diag) + diag
    assert [coefficient for coefficient, _ in combined.terms] == [2.0, 1.0, 1.0]
    parts = combined.unflatten(vector(2))
    expected = 2 * dense.to_dense() + 2 * diag.to_dense()
    result = combined.mv(parts)
    assert isinstance(result, list)
    torch.testing.assert_close(
        torch.cat([part.reshape(-1) for part in result]), expected @ vector(2)
    )


def test_combinations_that_leave_the_operators_space_are_refused() -> None:
    operator = OPERATORS["dense"]
    with pytest.raises(ValueError, match="non-negative"):
        -1.0 * operator
    with pytest.raises(ValueError, match="non-negative"):
        float("nan") * operator
    with pytest.raises(TypeError):
        operator + 1.0
    with pytest.raises(TypeError):
        operator * torch.tensor(2.0)
    other = Diagonal(torch.ones(4, dtype=torch.float64), [torch.Size([4])])
    with pytest.raises(ValueError, match="param_shapes"):
        operator + other
    single = Dense(operator.to_dense().float(), operator.param_shapes)
    with pytest.raises(ValueError, match="dtype"):
        operator + single
    with pytest.raises(ValueError, match="damping > 0"):
        (0.0 * operator).solve(vector(0))


def test_the_transpose_is_the_operator() -> None:
    operator = OPERATORS["kfac"]
    assert operator.T is operator
    torch.testing.assert_close(operator.to_dense(), operator.to_dense().T)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_the_scipy_export_finds_the_top_eigenvalues(structure: str) -> None:
    operator = OPERATORS[structure]
    exported = operator.to_scipy()
    assert exported.shape == operator.shape and exported.dtype == np.float64
    v = vector(3)
    np.testing.assert_allclose(exported @ v.numpy(), (operator.to_dense() @ v).numpy())
    block = np.stack([vector(4).numpy(), vector(5).numpy()], axis=1)
    np.testing.assert_allclose(exported @ block, operator.to_dense().numpy() @ block)
    top = np.sort(eigsh(exported, k=3, which="LA", return_eigenvectors=False))
    expected = torch.linalg.eigvalsh(operator.to_dense())[-3:].numpy()
    np.testing.assert_allclose(top, expected, rtol=1e-8, atol=1e-12)


def test_a_float32_operator_exports_float32() -> None:
    model, inputs = model_and_inputs()
    operator = fisher(model.float(), inputs.float(), likelihood="categorical", structure="diag")
    exported = operator.to_scipy()
    assert exported.dtype == np.float32
    result = exported @ np.ones(operator.shape[0], dtype=np.float32)
    assert result.dtype == np.float32
