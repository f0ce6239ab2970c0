"""EKFAC's eigenvalues of an ``nn.Embedding``: the second moment of the per-sample weight
gradients in the basis ``Q_G ⊗ I`` (the input factor is diagonal).

Oracles: per-sample gradients written out densely (one-hot tokens) and from ``torch.func``;
the preconditioned gradient against the eigenbasis solve written out; an embedding called on
two halves of the tokens against one call on all of them.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, vmap

from natgrad.curvature.ekfac import embedding_second_moment
from natgrad.curvature.likelihoods import get_likelihood
from natgrad.optim import EKFAC

DTYPE = torch.float64
VOCABULARY = 6


@settings(max_examples=25, deadline=None)
@given(
    samples=st.integers(1, 4),
    locations=st.integers(1, 5),
    width=st.integers(1, 3),
    padding=st.sampled_from([None, 0, 5]),
    seed=st.integers(0, 99),
)
def test_second_moment_equals_dense_per_sample_gradients(
    samples: int, locations: int, width: int, padding: int | None, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCABULARY, (samples, locations, 1), generator=generator)
    grads = torch.randn(samples, locations, width, generator=generator, dtype=DTYPE)
    vectors = torch.linalg.qr(torch.randn(width, width, generator=generator, dtype=DTYPE))[0]
    one_hot = nn.functional.one_hot(tokens[..., 0], VOCABULARY).to(DTYPE)  # (N, T, V)
    if padding is not None:
        one_hot[..., padding] = 0.0
    per_sample = grads.mT @ one_hot  # (N, d, V): Σ_t g_t e_tᵀ
    expected = (vectors.T @ per_sample).square().sum(0)
    moment = embedding_second_moment(tokens, grads, vectors, VOCABULARY, padding)
    torch.testing.assert_close(moment, expected)


class Bag(nn.Module):
    """``head(tanh(Σ_t embedding(x_t)))``; with ``split`` the embedding is called on the first
    two tokens and on the rest, and the two sums added (the same function)."""

    def __init__(self, padding_idx: int | None = None, split: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(VOCABULARY, 4, padding_idx=padding_idx)
        self.head = nn.Linear(4, 3)
        self.split = split

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        parts = [tokens[:, :2], tokens[:, 2:]] if self.split else [tokens]
        return self.head(torch.tanh(sum(self.embedding(part).sum(1) for part in parts)))


def bag_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens with repeats within a sample (so that positions sum per token) and padding."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCABULARY, (7, 5), generator=generator)
    tokens[:, 0] = tokens[:, 1]
    tokens[:3, -1] = 0
    return tokens, torch.randint(0, 3, (7,), generator=generator)


def ekfac_step(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> EKFAC:
    precond = EKFAC(model.to(DTYPE), inv_update_interval=1, damping=0.1, eigenvalue_restart="batch")
    nn.functional.cross_entropy(model(tokens), targets).backward()
    precond.step()
    return precond


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_eigenvalues_and_step_from_per_sample_gradients(padding_idx: int | None) -> None:
    model = Bag(padding_idx).to(DTYPE)
    tokens, targets = bag_batch()
    params = {name: param.detach() for name, param in model.named_parameters()}

    def sample_loss(values, sample, target):
        logits = functional_call(model, values, (sample.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, target.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, tokens, targets)
    gradients = per_sample["embedding.weight"].mT  # (N, d, V)
    precond = ekfac_step(model, tokens, targets)
    state = precond.layers[0]
    vectors = state.output_eigen.vectors
    eigenvalues = (vectors.T @ gradients).square().mean(0)
    torch.testing.assert_close(state.eigenvalues, eigenvalues)
    mean_gradient = gradients.mean(0)
    step = vectors @ ((vectors.T @ mean_gradient) / (eigenvalues + 0.1))
    torch.testing.assert_close(model.embedding.weight.grad, step.T)


def test_exact_eigenvalues_add_each_columns_squares() -> None:
    """``fisher_type="exact"``: the eigenvalues are ``Σ_c mean_n (Q_Gᵀ g_nc)²`` over the
    per-sample gradients of ``s_nc · f_n``, ``s_c`` the columns of ``∇²A(f_n)^{1/2}``."""
    model = Bag(0).to(DTYPE)
    tokens, targets = bag_batch()
    params = {name: param.detach() for name, param in model.named_parameters()}
    with torch.no_grad():
        roots = get_likelihood("categorical").natural_hessian_sqrt(model(tokens))

    def column_product(values, sample, column):
        return (functional_call(model, values, (sample.unsqueeze(0),))[0] * column).sum()

    per_column = vmap(grad(column_product), in_dims=(None, 0, 0))
    gradients = torch.stack(
        [per_column(params, tokens, roots[..., c])["embedding.weight"].mT for c in range(3)]
    )  # (C, N, d, V)
    precond = EKFAC(
        model,
        fisher_type="exact",
        likelihood="categorical",
        inv_update_interval=1,
        damping=0.1,
        eigenvalue_restart="batch",
    )
    outputs = model(tokens)
    precond.sample_backward(outputs)
    nn.functional.cross_entropy(outputs, targets).backward()
    precond.step()
    state = precond.layers[0]
    vectors = state.output_eigen.vectors
    eigenvalues = (vectors.T @ gradients).square().mean(1).sum(0)
    torch.testing.assert_close(state.eigenvalues, eigenvalues)


def test_calls_on_parts_of_the_tokens_pool_as_one_call() -> None:
    tokens, targets = bag_batch()
    whole = ekfac_step(Bag(), tokens, targets).layers[0]
    parts = ekfac_step(Bag(split=True), tokens, targets).layers[0]
    torch.testing.assert_close(parts.output_factor, whole.output_factor)
    torch.testing.assert_close(parts.eigenvalues, whole.eigenvalues)


def test_second_moment_rejects_mismatched_inputs() -> None:
    tokens = torch.zeros(2, 3, 1, dtype=torch.long)
    grads = torch.zeros(2, 3, 4, dtype=DTYPE)
    vectors = torch.eye(4, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"tokens \(2, 3, 1\), output_grads \(2, 2, 4\)"):
        embedding_second_moment(tokens, grads[:, :2], vectors, VOCABULARY)
    with pytest.raises(ValueError, match=r"output_vectors \(3, 3\)"):
        embedding_second_moment(tokens, grads, vectors[:3, :3], VOCABULARY)
    with pytest.raises(ValueError, match="integer indices"):
        embedding_second_moment(tokens.to(DTYPE), grads, vectors, VOCABULARY)
    with pytest.raises(ValueError, match=r"\[0, 6\), got \[0, 6\]"):
        embedding_second_moment(tokens + torch.tensor([[[0]], [[6]]]), grads, vectors, VOCABULARY)
