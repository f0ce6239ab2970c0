"""EKFAC against brute-force float64 per-sample gradients and exact Fisher blocks."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from natgrad.curvature.ekfac import build_ekfac, embedding_second_moment
from natgrad.curvature.kfac import build_kfac
from natgrad.curvature.likelihoods import get_likelihood

DTYPE = torch.float64


def per_sample_jacobians(model: nn.Module, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Brute-force ``∂f(x_n)/∂θ`` per parameter name, shapes ``(N, C, *param.shape)``."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def output(p, x):
        return functional_call(model, p, (x.unsqueeze(0),)).reshape(-1)

    return vmap(jacrev(output), in_dims=(None, 0))(params, inputs)


def layer_backward_gradients(model, inputs, likelihood, layer_name: str, has_bias: bool):
    """Per-(sample, column) weight-matrix gradients ``J_nᵀ S_n[:, c]``: ``(N·C, d_out, d_in)``."""
    jacobians = per_sample_jacobians(model, inputs)
    weight = jacobians[f"{layer_name}.weight"]
    batch, classes = weight.shape[:2]
    matrix = weight.reshape(batch, classes, weight.shape[2], -1)
    if has_bias:
        matrix = torch.cat([matrix, jacobians[f"{layer_name}.bias"].unsqueeze(-1)], dim=-1)
    roots = likelihood.natural_hessian_sqrt(model(inputs).detach().reshape(batch, -1))
    gradients = torch.einsum("ncoi,nck->nkoi", matrix, roots)
    return gradients.reshape(-1, *gradients.shape[2:]), batch


def exact_block(gradients: torch.Tensor, batch: int) -> torch.Tensor:
    flat = gradients.flatten(1)
    return flat.T @ flat / batch


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def test_eigenvalues_equal_brute_force_projected_second_moment() -> None:
    torch.manual_seed(0)
    model = mlp().to(DTYPE)
    inputs = torch.randn(6, 3, dtype=DTYPE)
    likelihood = get_likelihood("categorical")
    ekfac = build_ekfac(model, inputs, likelihood=likelihood)
    for index, name in enumerate(["0", "2", "4"]):
        gradients, batch = layer_backward_gradients(model, inputs, likelihood, name, True)
        output_eigen, input_eigen = ekfac.eigenbases[index]
        projected = output_eigen.vectors.T @ gradients @ input_eigen.vectors
        torch.testing.assert_close(ekfac.eigenvalues[index], projected.square().sum(0) / batch)


def test_reduce_takes_the_reduced_factors_eigenbases_and_exact_eigenvalues() -> None:
    """With ``kfac_approx="reduce"`` the eigenbases diagonalise K-FAC-reduce's factors, and the
    eigenvalues are still the second moments of the exact per-sample gradients in them."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 3)
    ).to(DTYPE)
    inputs = torch.randn(5, 2, 3, 3, dtype=DTYPE)
    likelihood = get_likelihood("categorical")
    ekfac = build_ekfac(model, inputs, likelihood=likelihood, kfac_approx="reduce")
    kfac = build_kfac(model, inputs, likelihood=likelihood, kfac_approx="reduce")
    expand = build_kfac(model, inputs, likelihood=likelihood)
    assert not torch.allclose(kfac.input_factors[0], expand.input_factors[0])
    for index, name in enumerate(["0", "3"]):
        bases = ekfac.eigenbases[index]
        factors = (kfac.output_factors[index], kfac.input_factors[index])
        for eigen, factor in zip(bases, factors, strict=True):
            rebuilt = eigen.vectors @ torch.diag(eigen.values) @ eigen.vectors.T
            torch.testing.assert_close(rebuilt, factor)
        gradients, batch = layer_backward_gradients(model, inputs, likelihood, name, True)
        projected = bases[0].vectors.T @ gradients @ bases[1].vectors
        torch.testing.assert_close(ekfac.eigenvalues[index], projected.square().sum(0) / batch)


def test_ekfac_is_at_least_as_close_to_exact_blocks_as_kfac() -> None:
    torch.manual_seed(1)
    model = mlp().to(DTYPE)
    inputs = torch.randn(8, 3, dtype=DTYPE)
    likelihood = get_likelihood("categorical")
    kfac, ekfac = (
        build_kfac(model, inputs, likelihood=likelihood),
        build_ekfac(model, inputs, likelihood=likelihood),
    )
    for index, name in enumerate(["0", "2", "4"]):
        gradients, batch = layer_backward_gradients(model, inputs, likelihood, name, True)
        exact = exact_block(gradients, batch)
        positions = kfac.layers[index].flat_indices(kfac.offsets)
        kfac_block = kfac.to_dense()[positions][:, positions]
        ekfac_block = ekfac.to_dense()[positions][:, positions]
        kfac_error = torch.linalg.norm(kfac_block - exact)
        ekfac_error = torch.linalg.norm(ekfac_block - exact)
        assert ekfac_error <= kfac_error + 1e-12
        assert kfac_error > 1e-6  # K-FAC is not exact here, so the comparison means something


def test_ekfac_equals_kfac_where_kfac_is_exact() -> None:
    torch.manual_seed(2)
    model = mlp().to(DTYPE)
    inputs = torch.randn(1, 3, dtype=DTYPE)
    kfac = build_kfac(model, inputs, likelihood="poisson")
    ekfac = build_ekfac(model, inputs, likelihood="poisson")
    torch.testing.assert_close(ekfac.to_dense(), kfac.to_dense())


@pytest.mark.parametrize("conv", [False, True])
def test_mv_diag_solve_agree_with_dense(conv: bool) -> None:
    torch.manual_seed(3)
    if conv:
        model = nn.Sequential(
            nn.Conv2d(1, 2, 2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 16, 3)
        )
        inputs = torch.randn(4, 1, 3, 3, dtype=DTYPE)
    else:
        model = mlp()
        inputs = torch.randn(4, 3, dtype=DTYPE)
    model = model.to(DTYPE)
    ekfac = build_ekfac(model, inputs, likelihood="categorical")
    dense = ekfac.to_dense()
    vector = torch.randn(dense.shape[0], dtype=DTYPE)
    torch.testing.assert_close(ekfac.mv(vector), dense @ vector)
    torch.testing.assert_close(ekfac.diag(), dense.diagonal())
    solution = ekfac.solve(vector, 0.2)
    torch.testing.assert_close(dense @ solution + 0.2 * solution, vector)


def test_conv_eigenvalues_equal_projected_per_sample_conv_gradients() -> None:
    torch.manual_seed(4)
    conv = nn.Conv2d(2, 3, 2, stride=1, padding=0)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4, 2)).to(DTYPE)
    inputs = torch.randn(3, 2, 3, 3, dtype=DTYPE)
    likelihood = get_likelihood("gaussian")
    ekfac = build_ekfac(model, inputs, likelihood=likelihood)
    gradients, batch = layer_backward_gradients(model, inputs, likelihood, "0", True)
    output_eigen, input_eigen = ekfac.eigenbases[0]
    projected = output_eigen.vectors.T @ gradients @ input_eigen.vectors
    torch.testing.assert_close(ekfac.eigenvalues[0], projected.square().sum(0) / batch)


def test_empirical_ekfac_matches_observed_gradient_moment() -> None:
    torch.manual_seed(5)
    model = nn.Linear(3, 2).to(DTYPE)
    inputs = torch.randn(5, 3, dtype=DTYPE)
    targets = torch.randint(0, 2, (5, 2)).to(DTYPE)
    likelihood = get_likelihood("bernoulli")
    ekfac = build_ekfac(model, inputs, likelihood=likelihood, kind="empirical", targets=targets)
    residual = torch.sigmoid(model(inputs)).detach() - targets
    features = torch.cat([inputs, torch.ones(5, 1, dtype=DTYPE)], 1)
    gradients = residual.unsqueeze(2) * features.unsqueeze(1)
    output_eigen, input_eigen = ekfac.eigenbases[0]
    projected = output_eigen.vectors.T @ gradients @ input_eigen.vectors
    torch.testing.assert_close(ekfac.eigenvalues[0], projected.square().mean(0))


@pytest.mark.parametrize("padding_idx", [None, 2, -1])
def test_embedding_second_moment_equals_projected_per_sample_gradients(padding_idx) -> None:
    """Against ``nn.Embedding``'s own per-sample weight gradients (which skip ``padding_idx``,
    a negative one counted from the end): a negative index used to be matched against the
    tokens as is, so the padding token's gradients were counted."""
    vocabulary, width = 5, 3
    generator = torch.Generator().manual_seed(8)
    embedding = nn.Embedding(vocabulary, width, padding_idx=padding_idx).to(DTYPE)
    tokens = torch.tensor([[4, 4, 1, 2], [2, 0, 4, 3], [1, 1, 1, 4]])
    output_grads = torch.randn(3, 4, width, generator=generator, dtype=DTYPE)
    basis, _ = torch.linalg.qr(torch.randn(width, width, generator=generator, dtype=DTYPE))

    def pulled_back(weight, sample_tokens, sample_grads):
        outputs = functional_call(embedding, {"weight": weight}, (sample_tokens,))
        return (outputs * sample_grads).sum()

    weight = embedding.weight.detach()
    gradients = vmap(torch.func.grad(pulled_back), in_dims=(None, 0, 0))(
        weight, tokens, output_grads
    )
    expected = (gradients @ basis).square().sum(0).T
    moment = embedding_second_moment(
        tokens.unsqueeze(-1), output_grads, basis, vocabulary, padding_idx
    )
    torch.testing.assert_close(moment, expected)


def test_embedding_second_moment_rejects_a_padding_idx_outside_the_vocabulary() -> None:
    with pytest.raises(ValueError, match=r"padding_idx must lie in \[-3, 3\), got 3"):
        embedding_second_moment(
            torch.zeros(1, 1, 1, dtype=torch.long), torch.ones(1, 1, 2), torch.eye(2), 3, 3
        )
