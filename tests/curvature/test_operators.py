"""Dense/Diagonal/BlockDiagonal/Implicit operators: products, solves and conversions agree."""

import warnings

import pytest
import torch
from brute_force import DTYPE, exact_fisher, tiny_data, tiny_mlp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from natgrad.curvature import BlockDiagonal, Dense, Diagonal, Implicit, fisher, ggn, hessian

SHAPES = [torch.Size([2, 3]), torch.Size([3]), torch.Size([1])]
SIZE = 10


def random_spd(size: int, seed: int, rank: int | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(size, rank or size, generator=generator, dtype=DTYPE)
    return factor @ factor.T + (0.0 if rank else 0.1) * torch.eye(size, dtype=DTYPE)


def operator_and_matrix(kind: str, seed: int = 0):
    """An operator of each kind together with the dense matrix it represents."""
    matrix = random_spd(SIZE, seed)
    if kind == "dense":
        return Dense(matrix, SHAPES), matrix
    if kind == "diag":
        return Diagonal(matrix.diagonal().clone(), SHAPES), torch.diag(matrix.diagonal())
    if kind == "block":
        blocks = [matrix[:6, :6], matrix[6:9, 6:9], matrix[9:, 9:]]
        return BlockDiagonal(blocks, SHAPES), torch.block_diag(*blocks)
    return Implicit(lambda v: matrix @ v, SHAPES, DTYPE, torch.device("cpu")), matrix


KINDS = ("dense", "diag", "block", "implicit")


@pytest.mark.parametrize("kind", KINDS)
def test_methods_agree_with_the_dense_matrix(kind: str) -> None:
    operator, matrix = operator_and_matrix(kind)
    vector = torch.randn(SIZE, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    eye = torch.eye(SIZE, dtype=DTYPE)
    assert operator.shape == (SIZE, SIZE)
    torch.testing.assert_close(operator.to_dense(), matrix)
    torch.testing.assert_close(operator.mv(vector), matrix @ vector)
    torch.testing.assert_close(operator @ vector, matrix @ vector)
    torch.testing.assert_close(operator.diag(), matrix.diagonal())
    torch.testing.assert_close(operator.trace(), matrix.trace())
    for damping in (0.0, 0.3):
        expected = torch.linalg.solve(matrix + damping * eye, vector)
        torch.testing.assert_close(operator.solve(vector, damping), expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_list_vectors_round_trip(kind: str) -> None:
    operator, matrix = operator_and_matrix(kind)
    vector = torch.randn(SIZE, generator=torch.Generator().manual_seed(6), dtype=DTYPE)
    parts = [vector[:6].reshape(2, 3), vector[6:9], vector[9:]]
    product = operator.mv(parts)
    assert isinstance(product, list)
    assert [p.shape for p in product] == SHAPES
    torch.testing.assert_close(torch.cat([p.reshape(-1) for p in product]), matrix @ vector)
    solution = operator.solve(parts, damping=0.5)
    assert isinstance(solution, list)
    torch.testing.assert_close(
        torch.cat([p.reshape(-1) for p in solution]), operator.solve(vector, damping=0.5)
    )


@pytest.mark.parametrize("kind", KINDS)
def test_bad_vectors_and_damping_raise(kind: str) -> None:
    operator, _ = operator_and_matrix(kind)
    with pytest.raises(ValueError, match="shape"):
        operator.mv(torch.zeros(SIZE + 1, dtype=DTYPE))
    with pytest.raises(ValueError, match="per-parameter"):
        operator.mv([torch.zeros(6, dtype=DTYPE)])
    with pytest.raises(ValueError, match="damping"):
        operator.solve(torch.zeros(SIZE, dtype=DTYPE), damping=-1.0)
    for value in (float("nan"), float("inf")):
        broken = torch.zeros(SIZE, dtype=DTYPE)
        broken[3] = value
        with pytest.raises(ValueError, match="vector must not contain infs or NaNs"):
            operator.solve(broken, damping=0.1)


def test_constructors_validate_shapes() -> None:
    with pytest.raises(ValueError, match="matrix must have shape"):
        Dense(torch.eye(9, dtype=DTYPE), SHAPES)
    with pytest.raises(ValueError, match="diagonal must have shape"):
        Diagonal(torch.ones(9, dtype=DTYPE), SHAPES)
    with pytest.raises(ValueError, match="diagonal must not contain"):
        Diagonal(torch.full((SIZE,), float("nan"), dtype=DTYPE), SHAPES)
    with pytest.raises(ValueError, match="one block per parameter"):
        BlockDiagonal([torch.eye(6, dtype=DTYPE)], SHAPES)
    with pytest.raises(ValueError, match="block 1"):
        BlockDiagonal([torch.eye(6), torch.eye(2), torch.eye(1)], SHAPES)


def test_diagonal_solve_clamps_zero_entries_and_needs_a_positive_one() -> None:
    diagonal = torch.tensor([4.0, 0.0, 1.0], dtype=DTYPE)
    operator = Diagonal(diagonal, [torch.Size([3])])
    solution = operator.solve(torch.ones(3, dtype=DTYPE))
    assert torch.isfinite(solution).all()
    floor = 4.0 * torch.finfo(DTYPE).eps ** 0.5
    torch.testing.assert_close(solution, torch.tensor([0.25, 1 / floor, 1.0], dtype=DTYPE))
    with pytest.raises(torch.linalg.LinAlgError, match="damping"):
        Diagonal(torch.zeros(3, dtype=DTYPE), [torch.Size([3])]).solve(torch.ones(3, dtype=DTYPE))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), damping=st.floats(1e-3, 10.0))
def test_implicit_cg_solve_matches_dense_solve(seed: int, damping: float) -> None:
    matrix = random_spd(SIZE, seed, rank=4)
    operator = Implicit(lambda v: matrix @ v, SHAPES, DTYPE, torch.device("cpu"), cg_rtol=1e-12)
    vector = torch.randn(SIZE, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    expected = torch.linalg.solve(matrix + damping * torch.eye(SIZE, dtype=DTYPE), vector)
    torch.testing.assert_close(operator.solve(vector, damping), expected, rtol=1e-8, atol=1e-8)
    assert operator.last_cg_info.converged


def test_implicit_solve_warns_when_cg_does_not_converge() -> None:
    matrix = random_spd(SIZE, 1)
    operator = Implicit(lambda v: matrix @ v, SHAPES, DTYPE, torch.device("cpu"), cg_max_iter=1)
    with pytest.warns(RuntimeWarning, match="conjugate gradients"):
        solution = operator.solve(torch.ones(SIZE, dtype=DTYPE))
    assert torch.isfinite(solution).all()
    assert not operator.last_cg_info.converged


@pytest.mark.parametrize("structure", ("dense", "diag", "block", "implicit"))
@pytest.mark.parametrize("builder", ("fisher", "ggn", "hessian"))
def test_built_operators_are_self_consistent(builder: str, structure: str) -> None:
    model = tiny_mlp()
    inputs, targets = tiny_data("categorical")
    if builder == "fisher":
        operator = fisher(model, inputs, structure=structure)
    else:
        build = ggn if builder == "ggn" else hessian
        operator = build(model, inputs, nn.CrossEntropyLoss(), targets, structure=structure)
    matrix = operator.to_dense()
    size = matrix.shape[0]
    vector = torch.randn(size, generator=torch.Generator().manual_seed(8), dtype=DTYPE)
    torch.testing.assert_close(operator.mv(vector), matrix @ vector)
    torch.testing.assert_close(operator.diag(), matrix.diagonal())
    torch.testing.assert_close(operator.trace(), matrix.trace())
    torch.testing.assert_close(matrix, matrix.T)
    damping = 5.0 if builder == "hessian" else 0.1
    solution = operator.solve(vector, damping)
    torch.testing.assert_close(matrix @ solution + damping * solution, vector, rtol=1e-6, atol=1e-6)
    parts = operator.unflatten(vector)
    listed = operator.mv(parts)
    torch.testing.assert_close(torch.cat([p.reshape(-1) for p in listed]), matrix @ vector)


@pytest.mark.parametrize("structure", ("dense", "block", "implicit", "diag"))
def test_singular_fisher_solves_are_finite(structure: str) -> None:
    """Two float32 data points, 31 parameters: the Fisher has rank at most 4."""
    model = tiny_mlp().float()
    inputs = tiny_data("categorical", samples=2)[0].float()
    operator = fisher(model, inputs, structure=structure)
    gradient = torch.randn(31, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        undamped = operator.solve(gradient, damping=0.0)
    assert undamped.dtype == torch.float32
    assert torch.isfinite(undamped).all()
    damped = operator.solve(gradient, damping=1e-2)
    reference = exact_fisher(model.double(), inputs.double(), "categorical")
    if structure == "diag":
        reference = torch.diag(reference.diagonal())
    elif structure == "block":
        reference = torch.block_diag(
            reference[:12, :12],
            reference[12:16, 12:16],
            reference[16:28, 16:28],
            reference[28:, 28:],
        )
    expected = torch.linalg.solve(reference + 1e-2 * torch.eye(31, dtype=DTYPE), gradient.double())
    torch.testing.assert_close(damped.double(), expected, rtol=2e-3, atol=2e-3)
