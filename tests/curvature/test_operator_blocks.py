"""Blocks of column vectors: ``C @ V``, ``C.mv(V)`` and ``C.solve(V, λ)`` for ``V`` of shape
``(P, K)`` equal the float64 dense oracles ``D V`` and ``(D + λI)⁻¹ V`` and the column-by-column
products and solves, for every operator class; the SciPy export's ``matmat`` is one batched
product, not a loop over columns."""

import math
import re
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from natgrad.curvature import CurvatureOperator, Implicit, fisher

DTYPE = torch.float64


class MatrixOnly(CurvatureOperator):
    """A subclass that implements only the abstract methods: blocks go column by column."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__([matrix.shape[:1]], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _mv_flat(self, vector: torch.Tensor) -> torch.Tensor:
        return self.matrix @ vector

    def _solve_flat(self, vector: torch.Tensor, damping: float) -> torch.Tensor:
        eye = torch.eye(len(vector), dtype=vector.dtype)
        return torch.linalg.solve(self.matrix + damping * eye, vector)

    def _diag_flat(self) -> torch.Tensor:
        return self.matrix.diagonal().clone()

    def _to_dense(self) -> torch.Tensor:
        return self.matrix.clone()


def conv_net() -> nn.Module:
    """A grouped convolution with bias, a Linear with bias and one without: every Kronecker
    layout (groups, folded bias, plain weight)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 2, groups=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(16, 5),
        nn.Tanh(),
        nn.Linear(5, 3, bias=False),
    ).to(DTYPE)


def build_operators() -> tuple[dict[str, CurvatureOperator], dict[str, torch.Tensor]]:
    """Operators by name, and the float64 dense matrix each one represents (the exact Fisher
    for ``"implicit"``, computed by the dense builder, not by the implicit operator)."""
    model = conv_net()
    inputs = torch.randn(6, 2, 3, 3, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    built = {
        structure: fisher(model, inputs, likelihood="categorical", structure=structure)
        for structure in ("dense", "diag", "block", "kfac", "ekfac", "implicit")
    }
    dense = {name: operator.to_dense() for name, operator in built.items()}
    dense["implicit"] = dense["dense"]
    built["sum"] = built["kfac"] + 0.5 * built["diag"] + built["implicit"]
    dense["sum"] = dense["kfac"] + 0.5 * dense["diag"] + dense["dense"]
    built["scaled"] = 2.0 * built["ekfac"]
    dense["scaled"] = 2.0 * dense["ekfac"]
    built["matrix-only"] = MatrixOnly(dense["dense"])
    dense["matrix-only"] = dense["dense"]
    return built, dense


OPERATORS, MATRICES = build_operators()
NAMES = list(OPERATORS)
SIZE = OPERATORS["dense"].shape[0]


def block(columns: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(SIZE, columns, generator=generator, dtype=DTYPE)


def test_the_structures_differ() -> None:
    """The oracles are distinct matrices, so agreeing with each one is a test of each path."""
    assert SIZE == 4 * 2 * 2 + 4 + 16 * 5 + 5 + 5 * 3
    for name in ("diag", "block", "kfac", "ekfac"):
        assert not torch.allclose(MATRICES[name], MATRICES["dense"])


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(NAMES), columns=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_a_block_product_is_the_dense_product_and_the_columns_products(
    name: str, columns: int, seed: int
) -> None:
    operator, matrix = OPERATORS[name], MATRICES[name]
    vectors = block(columns, seed)
    product = operator @ vectors
    assert product.shape == (SIZE, columns) and product.dtype == DTYPE
    torch.testing.assert_close(product, matrix @ vectors, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(operator.mv(vectors), product, rtol=0, atol=0)
    by_column = torch.stack([operator.mv(column) for column in vectors.unbind(1)], dim=1)
    torch.testing.assert_close(product, by_column, rtol=1e-12, atol=1e-14)


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    columns=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    damping=st.sampled_from([1e-2, 0.1, 1.0]),
)
def test_a_block_solve_is_the_dense_solve_and_the_columns_solves(
    name: str, columns: int, seed: int, damping: float
) -> None:
    operator, matrix = OPERATORS[name], MATRICES[name]
    vectors = block(columns, seed)
    eye = torch.eye(SIZE, dtype=DTYPE)
    oracle = torch.linalg.solve(matrix + damping * eye, vectors)
    solution = operator.solve(vectors, damping)
    assert solution.shape == (SIZE, columns)
    error = torch.linalg.vector_norm(solution - oracle, dim=0)
    assert bool((error <= 1e-6 * torch.linalg.vector_norm(oracle, dim=0)).all())  # CG: rtol 1.5e-8
    by_column = torch.stack([operator.solve(v, damping) for v in vectors.unbind(1)], dim=1)
    torch.testing.assert_close(solution, by_column, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_a_block_without_columns_gives_one_without_columns(name: str) -> None:
    operator = OPERATORS[name]
    empty = torch.zeros(SIZE, 0, dtype=DTYPE)
    assert (operator @ empty).shape == (SIZE, 0)
    assert operator.solve(empty, 0.1).shape == (SIZE, 0)


@pytest.mark.parametrize("name", NAMES)
def test_blocks_of_the_wrong_shape_are_refused(name: str) -> None:
    operator = OPERATORS[name]
    for shape in [(SIZE, 2, 1), (SIZE + 1, 2), (2, SIZE), ()]:
        bad = torch.zeros(shape, dtype=DTYPE)
        message = re.escape(f"({SIZE}, K), got {shape}")
        with pytest.raises(ValueError, match=message):
            operator @ bad
        with pytest.raises(ValueError, match=message):
            operator.solve(bad, 0.1)
    broken = block(3, 0)
    broken[5, 2] = float("nan")
    with pytest.raises(ValueError, match="infs or NaNs"):
        operator @ broken


def factored_inverse(operator, damping: float) -> torch.Tensor:
    """``⊕ₗ (G + √λ/π I)⁻¹ ⊗ (A + π√λ I)⁻¹``, ``π² = (tr A / d_A) / (tr G / d_G)`` per group,
    as a dense matrix from the factors."""
    inverse = torch.zeros(SIZE, SIZE, dtype=DTYPE)
    pairs = zip(operator.output_factors, operator.input_factors, operator.positions, strict=True)
    for output_factor, input_factor, positions in pairs:
        groups = zip(
            output_factor.reshape(-1, *output_factor.shape[-2:]),
            input_factor.reshape(-1, *input_factor.shape[-2:]),
            strict=True,
        )
        blocks = []
        for g, a in groups:
            pi = math.sqrt((a.trace() / len(a)) / (g.trace() / len(g)))
            eye_g, eye_a = torch.eye(len(g), dtype=DTYPE), torch.eye(len(a), dtype=DTYPE)
            left = torch.linalg.inv(g + math.sqrt(damping) / pi * eye_g)
            right = torch.linalg.inv(a + pi * math.sqrt(damping) * eye_a)
            blocks.append(torch.kron(left, right))
        inverse[positions.unsqueeze(1), positions.unsqueeze(0)] = torch.block_diag(*blocks)
    return inverse


def test_the_factored_kfac_solve_takes_blocks() -> None:
    operator = OPERATORS["kfac"]
    vectors = block(3, 7)
    solution = operator.solve_factored(vectors, 0.1)
    assert solution.shape == (SIZE, 3)
    torch.testing.assert_close(solution, factored_inverse(operator, 0.1) @ vectors)
    by_column = torch.stack([operator.solve_factored(v, 0.1) for v in vectors.unbind(1)], dim=1)
    torch.testing.assert_close(solution, by_column, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_the_scipy_matmat_is_one_batched_product(name: str, monkeypatch) -> None:
    """Before: ``matmat`` called the single-vector product once per column."""
    operator = OPERATORS[name]
    calls = []
    original = type(operator)._mv_flat
    monkeypatch.setattr(
        type(operator), "_mv_flat", lambda self, v: calls.append(1) or original(self, v)
    )
    vectors = block(4, 3)
    exported = operator.to_scipy()
    result = exported.matmat(vectors.numpy())
    assert calls == ([1] * 4 if name == "matrix-only" else [])
    np.testing.assert_allclose(result, (MATRICES[name] @ vectors).numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(exported.rmatmat(vectors.numpy()), result, rtol=0, atol=0)


def test_an_implicit_block_solve_reports_its_least_converged_column() -> None:
    matrix = MATRICES["dense"]
    operator = Implicit(lambda v: matrix @ v, OPERATORS["dense"].param_shapes, DTYPE, "cpu")
    vectors = torch.cat([torch.zeros(SIZE, 1, dtype=DTYPE), block(2, 4)], dim=1)
    operator.solve(vectors, 0.01)
    info = operator.last_cg_info
    assert info.converged and info.iterations > 0  # not the zero column's (0 iterations)
    operator.cg_max_iter = 1
    with pytest.warns(RuntimeWarning, match="2 of 3 columns fell short") as caught:
        operator.solve(vectors, 0.01)
    assert caught[0].filename == __file__
    assert not operator.last_cg_info.converged and operator.last_cg_info.iterations == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        operator.solve(vectors[:, :1], 0.01)  # the zero column alone converges at once
