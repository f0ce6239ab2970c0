"""Twin set-ups that must agree: one Fisher reached through several structures, operator
identities, and solves against float64 dense oracles."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import natgrad
from natgrad.curvature import BlockDiagonal, Dense, Diagonal, Implicit

EXACT = ("dense", "block", "implicit")
SHAPES = [torch.Size([3])]


@pytest.fixture(scope="module")
def operators():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    inputs = torch.randn(7, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    structures = ("dense", "diag", "block", "implicit")
    options = {"likelihood": "categorical", "kind": "exact"}
    return {s: natgrad.fisher(model, inputs, structure=s, **options) for s in structures}


def test_exact_structures_represent_the_same_matrix(operators) -> None:
    dense = operators["dense"].to_dense()
    torch.testing.assert_close(operators["implicit"].to_dense(), dense)
    sizes = [shape.numel() for shape in operators["dense"].param_shapes]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    blocks = [dense[a : a + n, a : a + n] for a, n in zip(starts, sizes, strict=True)]
    torch.testing.assert_close(operators["block"].to_dense(), torch.block_diag(*blocks))
    for operator in operators.values():
        torch.testing.assert_close(operator.diag(), dense.diagonal())


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    scale=st.floats(-3.0, 3.0),
    damping=st.sampled_from([1e-3, 0.1, 2.0]),
)
def test_linearity_symmetry_and_damped_solves(operators, seed, scale, damping) -> None:
    """C(a u + v) = a C u + C v, uᵀ C v = vᵀ C u, and (C + λI)⁻¹ matches a float64 solve."""
    generator = torch.Generator().manual_seed(seed)
    size = operators["dense"].shape[0]
    u, v = torch.randn(2, size, generator=generator, dtype=torch.float64)
    for name in EXACT:
        operator = operators[name]
        matrix = operator.to_dense()
        torch.testing.assert_close(
            operator @ (scale * u + v), scale * (operator @ u) + operator @ v
        )
        torch.testing.assert_close(u @ (operator @ v), v @ (operator @ u))
        oracle = torch.linalg.solve(matrix + damping * torch.eye(size, dtype=matrix.dtype), v)
        torch.testing.assert_close(operator.solve(v, damping), oracle, rtol=1e-6, atol=1e-8)


def test_float32_operators_agree_with_float64(operators) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    inputs = torch.randn(7, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name, wide in operators.items():
        narrow = natgrad.fisher(
            model, inputs.float(), likelihood="categorical", kind="exact", structure=name
        )
        assert narrow.dtype == torch.float32
        torch.testing.assert_close(
            narrow.to_dense().double(), wide.to_dense(), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize(
    "operator",
    [
        Diagonal(torch.ones(3), SHAPES),
        Dense(torch.eye(3), SHAPES),
        BlockDiagonal([torch.eye(3)], SHAPES),
        Implicit(lambda v: v, SHAPES, torch.float32, torch.device("cpu")),
    ],
    ids=["diag", "dense", "block", "implicit"],
)
def test_solve_refuses_a_float64_vector_for_a_float32_operator(operator) -> None:
    """A float64 1e300 became inf in float32 (Diagonal returned inf silently, long ago); then
    it was refused as an overflow while other float64 vectors were cast silently. Now every
    float64 vector is refused by a float32 operator, naming both dtypes."""
    vector = torch.tensor([1e300, 1.0, 1.0], dtype=torch.float64)
    with pytest.raises(TypeError, match=r"torch\.float64 .* torch\.float32"):
        operator.solve(vector, 0.1)


@pytest.mark.parametrize("structure", ["dense", "diag", "block", "implicit"])
def test_mv_refuses_a_non_finite_or_float64_vector(structure: str) -> None:
    """``mv`` checks its vector as ``solve`` does: NaN, inf, and a float64 vector for a float32
    operator are named instead of coming back as NaN, inf or float32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    operator = natgrad.fisher(
        model, torch.randn(4, 3), likelihood="categorical", structure=structure
    )
    size = operator.shape[0]
    for bad in (math.nan, math.inf):
        vector = torch.ones(size)
        vector[0] = bad
        with pytest.raises(ValueError, match="infs or NaNs"):
            operator.mv(vector)
    overflowing = torch.ones(size, dtype=torch.float64)
    overflowing[0] = 1e300
    with pytest.raises(TypeError, match=r"torch\.float64 .* torch\.float32"):
        operator.mv(overflowing)
