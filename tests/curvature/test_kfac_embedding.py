"""K-FAC and EKFAC operators of models with an ``nn.Embedding``: its block is ``G ⊗ diag(a)``
over the transposed weight ``(d, V)``, ``a`` the token frequencies, kept as a vector ``(V,)``.

Oracles: the brute-force float64 Fisher (``torch.func`` per-sample Jacobians) where K-FAC is
exact, and the same model with the embedding written as an ``nn.Linear(V, d, bias=False)`` on
one-hot inputs (padding positions as zero vectors), whose K-FAC and EKFAC operators the
embedding's must equal entry for entry (the one-hot layer's ``A`` is the diagonal matrix of
the token frequencies).
"""

import copy
import resource

import pytest
import torch
import torch.nn.functional as functional
from brute_force import exact_fisher
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from distributed_helpers import run_on_processes
from natgrad.curvature import fisher, ggn
from natgrad.curvature.ekfac import build_ekfac
from natgrad.curvature.kfac import KFAC, build_kfac
from natgrad.distributed import GlobalBatch
from natgrad.linalg.kron import (
    block_diagonal_kron,
    eigenbasis_solve,
    factor_eigh,
    factored_solve,
    kron_diagonal,
    kron_mv,
)
from natgrad.optim import KFAC as KFACOptimizer

DTYPE = torch.float64
VOCABULARY, WIDTH, OUTPUTS = 6, 3, 4
BUILDS = {"kfac": build_kfac, "ekfac": build_ekfac}


class TokenModel(nn.Module):
    """Embedding → tanh → Linear at every position → mean over the positions: ``(N, C)``
    logits from ``(N,)`` or ``(N, T)`` tokens; ``calls=2`` applies the embedding to the two
    halves of the positions separately (weight sharing across calls)."""

    def __init__(self, padding_idx: int | None = None, calls: int = 1, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embedding = nn.Embedding(VOCABULARY, WIDTH, padding_idx=padding_idx)
        self.head = nn.Linear(WIDTH, OUTPUTS)
        self.calls = calls

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.calls == 1:
            features = self.encode(tokens)
        else:
            half = tokens.shape[1] // 2
            first, second = self.encode(tokens[:, :half]), self.encode(tokens[:, half:])
            features = torch.cat([first, second], dim=1)
        logits = self.head(torch.tanh(features))
        return logits.reshape(len(tokens), -1, OUTPUTS).mean(dim=1)


class OneHotTwin(TokenModel):
    """``model`` with its embedding replaced by ``Linear(V, d, bias=False)`` holding the
    transposed weight, applied to one-hot tokens (a padding token's one-hot zeroed: its row of
    the embedding is zero and gets no gradient)."""

    def __init__(self, model: TokenModel) -> None:
        super().__init__(model.embedding.padding_idx, model.calls)
        del self.embedding, self.head  # registered again below, in the order of the model's
        self.padding_idx = model.embedding.padding_idx
        self.encoder = nn.Linear(VOCABULARY, WIDTH, bias=False)
        self.head = copy.deepcopy(model.head)
        with torch.no_grad():
            self.encoder.weight.copy_(model.embedding.weight.mT)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        one_hot = functional.one_hot(tokens, VOCABULARY).to(self.encoder.weight.dtype)
        if self.padding_idx is not None:
            one_hot[..., self.padding_idx] = 0
        return self.encoder(one_hot)


def model_and_twin(**options) -> tuple[TokenModel, OneHotTwin]:
    model = TokenModel(**options).to(DTYPE)
    return model, OneHotTwin(model).to(DTYPE)


def twin_permutation(operator) -> torch.Tensor:
    """``perm`` with ``ours_flat = twin_flat[perm]``: the embedding's weight ``(V, d)`` is the
    transpose of the twin's ``(d, V)``, the other parameters are in the same places."""
    twin_pieces = operator.unflatten(torch.arange(operator.shape[0]))
    pieces = [twin_pieces[0].reshape(WIDTH, VOCABULARY).mT, *twin_pieces[1:]]
    return torch.cat([piece.reshape(-1) for piece in pieces])


def assert_same_operator(ours, twin, generator: torch.Generator) -> None:
    """Every method of ``ours`` equals ``twin``'s up to the permutation of the parameters."""
    perm = twin_permutation(twin)
    size = ours.shape[0]
    assert twin.shape[0] == size
    vector = torch.randn(size, generator=generator, dtype=DTYPE)
    block = torch.randn(size, 3, generator=generator, dtype=DTYPE)
    twin_dense = twin.to_dense()
    torch.testing.assert_close(ours.to_dense(), twin_dense[perm][:, perm])
    torch.testing.assert_close(ours.diag(), twin.diag()[perm])
    torch.testing.assert_close(ours.trace(), twin.trace())
    torch.testing.assert_close(ours.mv(vector[perm]), twin.mv(vector)[perm])
    torch.testing.assert_close(ours @ block[perm], (twin @ block)[perm])
    for damping in (1e-3, 0.5):
        torch.testing.assert_close(
            ours.solve(vector[perm], damping), twin.solve(vector, damping)[perm]
        )
        torch.testing.assert_close(
            ours.solve(block[perm], damping), twin.solve(block, damping)[perm]
        )
    if isinstance(ours, KFAC):
        torch.testing.assert_close(
            ours.solve_factored(vector[perm], 0.1), twin.solve_factored(vector, 0.1)[perm]
        )
        torch.testing.assert_close(ours.input_factors[0], twin.input_factors[0].diagonal())
        torch.testing.assert_close(ours.output_factors[0], twin.output_factors[0])


def distinct_frequency_tokens(samples: int, positions: int, seed: int) -> torch.Tensor:
    """Tokens ``(N, T)`` whose seen tokens have pairwise different counts (1, 2, 3, ... up to
    the last, which takes the rest), so that the one-hot twin's ``A`` has no repeated non-zero
    eigenvalue and its eigenbasis is the standard one up to order and signs (EKFAC depends on
    the basis within a repeated eigenvalue)."""
    total, counts, token = samples * positions, [], 0
    while sum(counts) + token + 1 <= total - (token + 2) and token < VOCABULARY - 2:
        counts.append(token + 1)
        token += 1
    counts.append(total - sum(counts))
    flat = torch.cat([torch.full((count,), index) for index, count in enumerate(counts)])
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    return flat[order].reshape(samples, positions)


# -- the Kronecker helpers with a diagonal input factor ----------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_diagonal_input_factor_helpers_equal_the_dense_kronecker_product(dtype):
    """``a`` of shape ``(V,)`` stands for ``diag(a)`` in every helper: against ``torch.kron``
    with the dense diagonal matrix (a zero and a negative round-off entry of ``a``: the
    eigenvalues are clamped at zero)."""
    generator = torch.Generator().manual_seed(15)
    root = torch.randn(3, 3, generator=generator, dtype=DTYPE)
    output_factor = (root @ root.mT).to(dtype)
    diagonal = torch.tensor([0.5, 0.0, 2.0, -1e-18, 0.25], dtype=DTYPE).to(dtype)
    matrix = torch.randn(2, 3, 5, generator=generator, dtype=DTYPE).to(dtype)
    dense = torch.kron(output_factor.to(DTYPE), torch.diag(diagonal.to(DTYPE).clamp_min(0)))
    flat = matrix.to(DTYPE).reshape(2, -1)
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == DTYPE else {"rtol": 3e-2, "atol": 0.1}
    torch.testing.assert_close(
        kron_mv(output_factor, diagonal, matrix).to(DTYPE).reshape(2, -1),
        flat @ dense.mT,
        **tolerance,
    )
    torch.testing.assert_close(
        kron_diagonal(output_factor, diagonal).to(DTYPE).reshape(-1), dense.diagonal(), **tolerance
    )
    torch.testing.assert_close(block_diagonal_kron(output_factor, diagonal).to(DTYPE), dense,
                               **tolerance)  # fmt: skip
    output_eigen, input_eigen = factor_eigh(output_factor), factor_eigh(diagonal)
    assert input_eigen.vectors is None
    assert input_eigen.values.dtype == output_eigen.values.dtype
    assert bool((input_eigen.values >= 0).all())
    eigenvalues = output_eigen.values.unsqueeze(-1) * input_eigen.values.unsqueeze(-2)
    working = matrix.to(output_eigen.values.dtype)
    damped = dense + 0.3 * torch.eye(len(dense), dtype=DTYPE)
    solved = eigenbasis_solve(output_eigen, input_eigen, eigenvalues, working, 0.3)
    expected = torch.linalg.solve(damped, flat.mT).mT
    torch.testing.assert_close(solved.to(DTYPE).reshape(2, -1), expected, **tolerance)
    traces = (torch.trace(output_factor.to(DTYPE)) / 3, diagonal.to(DTYPE).clamp_min(0).mean())
    pi = float((traces[1] / traces[0]).sqrt())
    factored = torch.kron(
        output_factor.to(DTYPE) + 0.3**0.5 / pi * torch.eye(3, dtype=DTYPE),
        torch.diag(diagonal.to(DTYPE).clamp_min(0)) + 0.3**0.5 * pi * torch.eye(5, dtype=DTYPE),
    )
    torch.testing.assert_close(
        factored_solve(output_eigen, input_eigen, working, 0.3).to(DTYPE).reshape(2, -1),
        torch.linalg.solve(factored, flat.mT).mT,
        **tolerance,
    )


# -- exact cases, against the brute-force Fisher -------------------------------------------------


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_alone_with_gaussian_likelihood_equals_exact_fisher(structure, padding_idx):
    """``f = W[x]``: the Gaussian Fisher is ``I ⊗ diag(a)`` at any batch size, which K-FAC's
    ``G ⊗ diag(a)`` is; the padding row has zero Fisher (its frequency is not counted in
    ``a``, and EKFAC's eigenvalues leave it out). The builders refused every embedding."""
    torch.manual_seed(0)
    model = nn.Embedding(VOCABULARY, WIDTH, padding_idx=padding_idx).to(DTYPE)
    tokens = torch.tensor([2, 0, 3, 3, 2, 5, 2])
    operator = fisher(model, tokens, likelihood="gaussian", structure=structure)
    expected = exact_fisher(model, tokens, "gaussian")
    torch.testing.assert_close(operator.to_dense(), expected)
    torch.testing.assert_close(operator.diag(), expected.diagonal())
    vector = torch.randn(len(expected), dtype=DTYPE)
    damped = expected + 0.3 * torch.eye(len(expected), dtype=DTYPE)
    torch.testing.assert_close(operator.solve(vector, 0.3), torch.linalg.solve(damped, vector))
    if padding_idx is not None:
        assert bool((expected[padding_idx * WIDTH : (padding_idx + 1) * WIDTH] == 0).all())


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
@pytest.mark.parametrize("token", [1, 4])
def test_one_sample_one_position_blocks_equal_exact_fisher(structure, token):
    """Batch 1 and one position: each layer's block (embedding and head) is the exact Fisher's
    diagonal block (token 4 is the padding token: its block is zero)."""
    model = TokenModel(padding_idx=4).to(DTYPE)
    tokens = torch.tensor([token])
    expected = exact_fisher(model, tokens, "categorical")
    dense = fisher(model, tokens, structure=structure).to_dense()
    split = VOCABULARY * WIDTH
    torch.testing.assert_close(dense[:split, :split], expected[:split, :split])
    torch.testing.assert_close(dense[split:, split:], expected[split:, split:])
    assert bool((dense[:split, split:] == 0).all())


# -- several samples and positions, against the one-hot twin -------------------------------------


CASES = {
    "N": ({}, (12,)),
    "NxT": ({}, (4, 3)),
    "padding_N": ({"padding_idx": 1}, (12,)),
    "padding_NxT": ({"padding_idx": 1}, (3, 4)),
    "two_calls": ({"calls": 2}, (4, 3)),
    "two_calls_padding": ({"calls": 2, "padding_idx": 0}, (3, 4)),
}


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
@pytest.mark.parametrize(("options", "shape"), list(CASES.values()), ids=list(CASES))
def test_operator_equals_one_hot_linear_twin(structure, options, shape):
    """mv, solve, solve_factored, diag, to_dense, trace and the factors equal those of the
    same model with the embedding as a Linear layer on one-hot tokens (``(N,)`` or ``(N, T)``
    tokens, a padding token, the embedding called twice)."""
    model, twin = model_and_twin(**options)
    samples, positions = shape[0], (shape[1] if len(shape) > 1 else 1)
    tokens = distinct_frequency_tokens(samples, positions, seed=1).reshape(shape)
    ours = fisher(model, tokens, structure=structure)
    reference = fisher(twin, tokens, structure=structure)
    assert_same_operator(ours, reference, torch.Generator().manual_seed(2))


def test_ekfac_eigenvalues_equal_one_hot_twins_in_its_token_order():
    """EKFAC's eigenvalues ``(d, V)``: the twin's eigenbasis of ``A`` is the standard basis in
    the order of the frequencies; reordered, its eigenvalues are the embedding's (the padding
    token's column zero)."""
    model, twin = model_and_twin(padding_idx=5)
    tokens = distinct_frequency_tokens(5, 3, seed=3)
    ours = build_ekfac(model, tokens, likelihood="categorical")
    reference = build_ekfac(twin, tokens, likelihood="categorical")
    assert ours.eigenbases[0][1].vectors is None
    assert ours.eigenvalues[0].shape == (WIDTH, VOCABULARY)
    order = reference.eigenbases[0][1].vectors.abs().argmax(dim=0)
    torch.testing.assert_close(ours.eigenvalues[0][:, order], reference.eigenvalues[0])
    torch.testing.assert_close(ours.eigenvalues[1], reference.eigenvalues[1])
    assert bool((ours.eigenvalues[0][:, 5] == 0).all())


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
def test_reduce_keeps_the_embedding_expanded(structure):
    """With ``kfac_approx="reduce"`` the embedding's block is expand's (a reduced ``A`` would be
    dense), the head's is reduce's: each equals the one-hot twin's block of that kind; with
    one position both kinds are the twin's reduce operator."""
    model, twin = model_and_twin()
    tokens = distinct_frequency_tokens(4, 3, seed=4)
    reduced = fisher(model, tokens, structure=structure, kfac_approx="reduce").to_dense()
    expanded = fisher(model, tokens, structure=structure).to_dense()
    twin_reduced = fisher(twin, tokens, structure=structure, kfac_approx="reduce")
    perm = twin_permutation(twin_reduced)
    reference = twin_reduced.to_dense()[perm][:, perm]
    split = VOCABULARY * WIDTH
    torch.testing.assert_close(reduced[:split, :split], expanded[:split, :split])
    torch.testing.assert_close(reduced[split:, split:], reference[split:, split:])
    assert not torch.allclose(reference[:split, :split], expanded[:split, :split])
    single = tokens[:, :1]
    assert_same_operator(
        fisher(model, single, structure=structure, kfac_approx="reduce"),
        fisher(twin, single, structure=structure, kfac_approx="reduce"),
        torch.Generator().manual_seed(5),
    )


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
@pytest.mark.parametrize("kind", ["mc", "empirical"])
def test_mc_and_empirical_kinds_equal_one_hot_twin(structure, kind):
    """The same outputs give the same seeded draws and the same observed-target gradients."""
    model, twin = model_and_twin(padding_idx=0)
    tokens = distinct_frequency_tokens(6, 2, seed=6)
    targets = torch.tensor([0, 3, 1, 2, 2, 1])

    def build(net):
        generator = torch.Generator().manual_seed(7)
        return fisher(
            net, tokens, kind=kind, structure=structure, targets=targets,
            mc_samples=3, generator=generator,
        )  # fmt: skip

    assert_same_operator(build(model), build(twin), torch.Generator().manual_seed(8))


def test_mc_is_reproducible_with_a_seeded_generator():
    model = TokenModel().to(DTYPE)
    tokens = torch.randint(0, VOCABULARY, (8, 3), generator=torch.Generator().manual_seed(9))

    def mc(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return fisher(model, tokens, kind="mc", structure="kfac", generator=generator).to_dense()

    torch.testing.assert_close(mc(1), mc(1), rtol=0, atol=0)
    assert not torch.allclose(mc(1), mc(2))


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
def test_ggn_of_cross_entropy_equals_twin_and_categorical_fisher(structure):
    """The GGN of the cross-entropy is the categorical Fisher, for the embedding's block too."""
    model, twin = model_and_twin(padding_idx=3)
    tokens = distinct_frequency_tokens(5, 2, seed=10)
    targets = torch.tensor([0, 1, 3, 2, 1])
    loss = nn.CrossEntropyLoss()
    ours = ggn(model, tokens, loss, targets, structure=structure)
    assert_same_operator(
        ours,
        ggn(twin, tokens, loss, targets, structure=structure),
        torch.Generator().manual_seed(13),
    )
    torch.testing.assert_close(
        ours.to_dense(), fisher(model, tokens, structure=structure).to_dense()
    )


@settings(max_examples=15, deadline=None)
@given(
    samples=st.integers(1, 4),
    positions=st.integers(1, 3),
    padding=st.one_of(st.none(), st.integers(0, VOCABULARY - 1)),
    seed=st.integers(0, 2**16),
)
def test_kfac_equals_twin_for_any_tokens(samples, positions, padding, seed):
    """Any tokens (repeated frequencies, unseen tokens, padding anywhere): K-FAC equals the
    one-hot twin's."""
    generator = torch.Generator().manual_seed(seed)
    model, twin = model_and_twin(padding_idx=padding, seed=seed)
    tokens = torch.randint(0, VOCABULARY, (samples, positions), generator=generator)
    ours = build_kfac(model, tokens, likelihood="categorical")
    reference = build_kfac(twin, tokens, likelihood="categorical")
    assert_same_operator(ours, reference, generator)


# -- size, dtypes, errors ---------------------------------------------------------------------


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
def test_large_vocabulary_keeps_a_diagonal_input_factor(structure):
    """V = 200 000: a dense ``A`` would take 320 GB (float64), its eigendecomposition far
    longer than this test; the factor is a vector and every method runs. Checked against the
    closed form ``G ⊗ diag(a)`` on the tokens seen (every other row of the weight has zero
    curvature, and ``solve`` divides by the damping alone there)."""
    vocabulary, width = 200_000, 4
    torch.manual_seed(11)
    model = nn.Sequential(nn.Embedding(vocabulary, width), nn.Tanh(), nn.Linear(width, 3))
    model = model.to(DTYPE)
    tokens = torch.tensor([7, 199_999, 7, 123_456, 0, 7])
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    operator = fisher(model, tokens, structure=structure)
    vector = torch.randn(operator.shape[0], dtype=DTYPE)
    solution = operator.solve(vector, 0.1)
    product = operator.mv(vector)
    diagonal = operator.diag()
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert peak_after - peak_before < 1_000_000  # kilobytes: well under a gigabyte
    weight_entries = vocabulary * width
    unseen = torch.ones(vocabulary, dtype=torch.bool)
    unseen[tokens] = False
    rows = vector[:weight_entries].reshape(vocabulary, width)
    torch.testing.assert_close(solution[:weight_entries].reshape(vocabulary, width)[unseen],
                               rows[unseen] / 0.1)  # fmt: skip
    assert bool((product[:weight_entries].reshape(vocabulary, width)[unseen] == 0).all())
    assert bool((diagonal[:weight_entries].reshape(vocabulary, width)[unseen] == 0).all())
    if isinstance(operator, KFAC):
        assert operator.input_factors[0].shape == (vocabulary,)
        counts = torch.bincount(tokens, minlength=vocabulary).to(DTYPE) / len(tokens)
        torch.testing.assert_close(operator.input_factors[0], counts)
        assert operator.solve_factored(vector, 0.1).shape == vector.shape
    else:
        assert operator.eigenvalues[0].shape == (width, vocabulary)


@pytest.mark.parametrize("build", list(BUILDS.values()), ids=list(BUILDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lower_precision_models_match_float64(build, dtype):
    """The operators of a float32/bfloat16/float16 model (eigendecompositions and solves in
    float32, results in the model's dtype) against the float64 exact Fisher of the Gaussian
    embedding, which K-FAC and EKFAC equal."""
    torch.manual_seed(12)
    reference_model = nn.Embedding(VOCABULARY, WIDTH, padding_idx=3).to(DTYPE)
    model = copy.deepcopy(reference_model).to(dtype)
    tokens = torch.tensor([[0, 1, 1], [2, 2, 3], [5, 5, 5]])
    flat_model = nn.Sequential(reference_model, nn.Flatten())
    expected = exact_fisher(flat_model, tokens, "gaussian")  # T I ⊗ diag(a): K-FAC's
    operator = build(nn.Sequential(model, nn.Flatten()), tokens, likelihood="gaussian")
    vector = torch.randn(len(expected), dtype=DTYPE)
    low = vector.to(dtype)
    damped = expected + 0.5 * torch.eye(len(expected), dtype=DTYPE)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    results = {
        "to_dense": (operator.to_dense(), expected),
        "diag": (operator.diag(), expected.diagonal()),
        "mv": (operator.mv(low), expected @ low.to(DTYPE)),
        "solve": (operator.solve(low, 0.5), torch.linalg.solve(damped, low.to(DTYPE))),
    }
    for name, (actual, reference) in results.items():
        assert actual.dtype == dtype, name
        scale = reference.abs().max()
        torch.testing.assert_close(
            actual.to(DTYPE), reference, rtol=0, atol=tolerance * scale, msg=name
        )


TOKEN_ERRORS = [
    (torch.tensor([[0, 6]]), r"layer 'embedding': tokens must lie in \[0, 6\), got 6"),
    (torch.tensor([[-1, 2]]), r"layer 'embedding': tokens must lie in \[0, 6\), got -1"),
    (torch.tensor([[0.0, 1.0]]), r"layer 'embedding': tokens must be integer.*float32"),
    (torch.tensor([[True, False]]), r"layer 'embedding': tokens must be integer.*bool"),
]


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
@pytest.mark.parametrize(
    ("tokens", "message"), TOKEN_ERRORS, ids=["high", "negative", "float", "bool"]
)
def test_bad_tokens_raise_naming_layer_and_value(structure, tokens, message):
    """Torch's own errors (``IndexError: index out of range in self``, a RuntimeError about
    the dtype) name neither the layer nor the token."""
    model = TokenModel().to(DTYPE)
    with pytest.raises(ValueError, match=message):
        fisher(model, tokens, structure=structure)
    with pytest.raises(ValueError, match=message):
        BUILDS[structure](model, tokens, likelihood="categorical")


class BagModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCABULARY, WIDTH)
        self.head = nn.Linear(WIDTH, OUTPUTS)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.bag(tokens))


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (BagModel, r"\['bag.weight'\] belong to other modules \(EmbeddingBag"),
        (
            lambda: nn.Sequential(nn.Embedding(VOCABULARY, WIDTH, max_norm=1.0), nn.Flatten()),
            r"embeddings \['0'\] have a max_norm",
        ),
        (
            lambda: nn.Sequential(
                nn.Embedding(VOCABULARY, WIDTH, scale_grad_by_freq=True), nn.Flatten()
            ),
            r"embeddings \['0'\] have scale_grad_by_freq=True",
        ),
    ],
    ids=["embedding_bag", "max_norm", "scale_grad_by_freq"],
)
def test_unsupported_embeddings_raise_naming_them(structure, make, message):
    model = make().to(DTYPE)
    tokens = torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match=message):
        fisher(model, tokens, likelihood="gaussian", structure=structure)


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
def test_sparse_embedding_gives_the_curvature_of_the_dense_one(structure):
    """``sparse=True`` changes only the layout of the weight's gradient (the weight-locality
    check used to fail on it, ``add(sparse, dense)``): the operator equals the exact Fisher of
    the same model with a dense embedding."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Embedding(VOCABULARY, WIDTH, sparse=True), nn.Flatten()).to(DTYPE)
    tokens = torch.tensor([[0, 1], [2, 2], [5, 1]])
    operator = fisher(model, tokens, likelihood="gaussian", structure=structure)
    dense_model = copy.deepcopy(model)
    dense_model[0].sparse = False
    torch.testing.assert_close(operator.to_dense(), exact_fisher(dense_model, tokens, "gaussian"))


OPTIMIZER_CASES = [
    pytest.param(None, "eigen", id="eigen"),
    pytest.param(None, "factored", id="factored"),
    pytest.param(2, "eigen", id="padding_eigen"),
    pytest.param(2, "factored", id="padding_factored"),
]


@pytest.mark.parametrize(("padding_idx", "damping_mode"), OPTIMIZER_CASES)
def test_builder_solves_as_the_kfac_optimizer_preconditions(padding_idx, damping_mode):
    """The two layers of the library agree: the empirical-Fisher K-FAC operator's ``solve``
    (``solve_factored``) of the batch gradient is the gradient that ``natgrad.optim.KFAC``
    writes, from this batch's factors alone, with exact (factored) damping."""
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Embedding(VOCABULARY, WIDTH, padding_idx=padding_idx),
        nn.Flatten(),
        nn.Linear(2 * WIDTH, OUTPUTS),
    ).to(DTYPE)
    generator = torch.Generator().manual_seed(14)
    tokens = torch.randint(0, VOCABULARY, (9, 2), generator=generator)
    tokens[0, 0] = 2
    targets = torch.randint(0, OUTPUTS, (9,), generator=generator)
    damping = 0.05
    precond = KFACOptimizer(
        model, factor_decay=0.0, inv_update_interval=1, damping=damping, damping_mode=damping_mode
    )
    nn.functional.cross_entropy(model(tokens), targets).backward()
    gradients = [param.grad.clone() for param in model.parameters()]
    precond.step()
    operator = build_kfac(
        model, tokens, likelihood="categorical", kind="empirical", targets=targets
    )
    if damping_mode == "eigen":
        expected = operator.solve(gradients, damping)
    else:
        expected = operator.solve_factored(gradients, damping)
    for param, solution in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(param.grad, solution)


def shard_operators(rank: int, world_size: int, tokens: torch.Tensor) -> dict:
    """Dense K-FAC/EKFAC (exact and seeded mc) of process ``rank``'s rows of ``tokens`` as
    shards of one global batch (3 rows on process 0, the rest on process 1)."""
    rows = slice(0, 3) if rank == 0 else slice(3, None)
    model = TokenModel(padding_idx=0).to(DTYPE)
    return {
        (structure, kind): fisher(
            model,
            tokens[rows],
            kind=kind,
            structure=structure,
            generator=torch.Generator().manual_seed(16),
            global_batch=GlobalBatch(),
        ).to_dense()
        for structure in ("kfac", "ekfac")
        for kind in ("exact", "mc")
    }


def test_shards_give_the_global_batchs_operators(tmp_path):
    """Two gloo processes with unequal shards (3 and 5 samples): the token frequencies, ``G``
    and EKFAC's eigenvalues are all-reduced into the global batch's, as one process gets them
    (the mc draws are the global batch's on every process)."""
    tokens = torch.randint(0, VOCABULARY, (8, 3), generator=torch.Generator().manual_seed(17))
    model = TokenModel(padding_idx=0).to(DTYPE)
    processes = run_on_processes(shard_operators, (tokens,), workdir=tmp_path)
    for structure, kind in processes[0]:
        generator = torch.Generator().manual_seed(16)
        expected = fisher(model, tokens, kind=kind, structure=structure, generator=generator)
        for result in processes:
            torch.testing.assert_close(result[(structure, kind)], expected.to_dense())
