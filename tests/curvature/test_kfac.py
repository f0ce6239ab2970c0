"""K-FAC operator against brute-force float64 Fisher matrices from per-sample Jacobians.

K-FAC is exact for a layer's diagonal block (i) at batch size 1 for any network, likelihood
and Fisher kind, and (ii) for deep linear networks with the Gaussian likelihood and the exact
Fisher at any batch size (output gradients do not depend on the input). Elsewhere the factors
are checked against brute-force expectations.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.nn.utils import prune
from torch.nn.utils.parametrizations import weight_norm

from grouped_conv import split_twin, twin_positions
from natgrad.curvature import fisher
from natgrad.curvature.ekfac import build_ekfac
from natgrad.curvature.kfac import KFAC, build_kfac
from natgrad.curvature.kfac_capture import (
    conv_patch_means,
    conv_patches,
    grouped_output_features,
    patch_features,
)
from natgrad.curvature.likelihoods import get_likelihood

DTYPE = torch.float64


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def per_sample_jacobians(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Brute-force ``J_n = ∂f(x_n)/∂θ``, shape ``(N, C, P)``."""
    params = trainable(model)

    def output(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (x.unsqueeze(0),)).reshape(-1)

    jacobians = vmap(jacrev(output), in_dims=(None, 0))(params, inputs)
    return torch.cat([jacobians[name].flatten(2) for name in params], dim=2)


def per_sample_nll_gradients(model, inputs, likelihood, targets) -> torch.Tensor:
    """Brute-force ``∇_θ nll(f(x_n), y_n)``, shape ``(N, P)``."""
    params = trainable(model)

    def nll(p, x, y):
        out = functional_call(model, p, (x.unsqueeze(0),))
        return likelihood.nll(out, y.unsqueeze(0)).sum()

    grads = vmap(torch.func.grad(nll), in_dims=(None, 0, 0))(params, inputs, targets)
    return torch.cat([grads[name].flatten(1) for name in params], dim=1)


def exact_fisher(model, inputs, likelihood) -> torch.Tensor:
    jacobians = per_sample_jacobians(model, inputs)
    hessians = likelihood.natural_hessian(model(inputs).detach().reshape(len(inputs), -1))
    return torch.einsum("nci,ncd,ndj->ij", jacobians, hessians, jacobians) / len(inputs)


def gradient_fisher(gradients: torch.Tensor) -> torch.Tensor:
    return gradients.T @ gradients / len(gradients)


def block_mask(model: nn.Module, layer_param_names: list[list[str]]) -> torch.Tensor:
    """Boolean ``(P, P)`` mask of the per-layer diagonal blocks."""
    names = list(trainable(model))
    sizes = [p.numel() for p in trainable(model).values()]
    offsets = torch.tensor([0, *sizes]).cumsum(0).tolist()
    total = offsets[-1]
    mask = torch.zeros(total, total, dtype=torch.bool)
    for group in layer_param_names:
        positions = torch.cat(
            [torch.arange(offsets[names.index(n)], offsets[names.index(n) + 1]) for n in group]
        )
        mask[positions.unsqueeze(1), positions.unsqueeze(0)] = True
    return mask


def linear_groups(model: nn.Module) -> list[list[str]]:
    return [
        [f"{name}.{p}" for p, _ in module.named_parameters()]
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))
    ]


def assert_blocks_equal(model, kfac: KFAC, reference: torch.Tensor) -> None:
    mask = block_mask(model, linear_groups(model))
    dense = kfac.to_dense()
    torch.testing.assert_close(dense[mask], reference[mask])
    assert (dense[~mask] == 0).all()


@settings(max_examples=10, deadline=None)
@given(
    batch=st.integers(1, 6),
    d_in=st.integers(1, 4),
    d_out=st.integers(1, 4),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_one_linear_layer_gaussian_exact_any_batch(batch, d_in, d_out, bias, seed) -> None:
    torch.manual_seed(seed)
    model = nn.Linear(d_in, d_out, bias=bias).to(DTYPE)
    inputs = torch.randn(batch, d_in, dtype=DTYPE)
    likelihood = get_likelihood("gaussian")
    kfac = build_kfac(model, inputs, likelihood=likelihood)
    torch.testing.assert_close(kfac.to_dense(), exact_fisher(model, inputs, likelihood))


@pytest.mark.parametrize("batch", [1, 7])
def test_deep_linear_network_gaussian_exact_blocks(batch: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.Linear(4, 2, bias=False), nn.Flatten(), nn.Linear(2, 3)
    ).to(DTYPE)
    inputs = torch.randn(batch, 3, dtype=DTYPE)
    likelihood = get_likelihood("gaussian")
    kfac = build_kfac(model, inputs, likelihood="gaussian")
    assert_blocks_equal(model, kfac, exact_fisher(model, inputs, likelihood))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3))


@pytest.mark.parametrize("name", ["categorical", "gaussian", "bernoulli", "poisson"])
def test_batch_one_exact_kind_equals_fisher_blocks(name: str) -> None:
    torch.manual_seed(1)
    model = mlp().to(DTYPE)
    inputs = torch.randn(1, 3, dtype=DTYPE)
    likelihood = get_likelihood(name)
    kfac = build_kfac(model, inputs, likelihood=name)
    assert_blocks_equal(model, kfac, exact_fisher(model, inputs, likelihood))


@pytest.mark.parametrize("depth_linear", [False, True])
def test_batch_one_empirical_kind_equals_empirical_fisher_blocks(depth_linear: bool) -> None:
    torch.manual_seed(2)
    model = (nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 3)) if depth_linear else mlp()).to(DTYPE)
    inputs = torch.randn(1, 3, dtype=DTYPE)
    targets = torch.tensor([2])
    likelihood = get_likelihood("categorical")
    kfac = build_kfac(model, inputs, likelihood=likelihood, kind="empirical", targets=targets)
    gradients = per_sample_nll_gradients(model, inputs, likelihood, targets)
    assert_blocks_equal(model, kfac, gradient_fisher(gradients))


def test_batch_one_mc_kind_equals_mc_fisher_blocks_with_same_samples() -> None:
    torch.manual_seed(3)
    model = mlp().to(DTYPE)
    inputs = torch.randn(1, 3, dtype=DTYPE)
    likelihood = get_likelihood("categorical")
    kfac = build_kfac(
        model,
        inputs,
        likelihood=likelihood,
        kind="mc",
        mc_samples=4,
        generator=torch.Generator().manual_seed(9),
    )
    generator = torch.Generator().manual_seed(9)
    outputs = model(inputs).detach()
    samples = [likelihood.sample(outputs, generator) for _ in range(4)]
    gradients = torch.cat([per_sample_nll_gradients(model, inputs, likelihood, y) for y in samples])
    assert_blocks_equal(model, kfac, gradient_fisher(gradients))


def test_mc_kind_is_reproducible_with_a_seeded_generator() -> None:
    torch.manual_seed(4)
    model = mlp().to(DTYPE)
    inputs = torch.randn(6, 3, dtype=DTYPE)

    def build(seed):
        return build_kfac(
            model,
            inputs,
            likelihood="categorical",
            kind="mc",
            mc_samples=2,
            generator=torch.Generator().manual_seed(seed),
        ).to_dense()

    torch.testing.assert_close(build(5), build(5), rtol=0, atol=0)
    assert not torch.equal(build(5), build(6))


def test_factors_equal_brute_force_expectations() -> None:
    """``A = mean a aᵀ`` from explicit activations; ``G = mean Jₛᵀ ∇²A Jₛ`` via torch.func."""
    torch.manual_seed(5)
    first, second = nn.Linear(3, 4).to(DTYPE), nn.Linear(4, 2).to(DTYPE)
    model = nn.Sequential(first, nn.Tanh(), second)
    inputs = torch.randn(6, 3, dtype=DTYPE)
    likelihood = get_likelihood("categorical")
    kfac = build_kfac(model, inputs, likelihood=likelihood)

    ones = torch.ones(6, 1, dtype=DTYPE)
    pre_activation = first(inputs).detach()
    hidden = torch.tanh(pre_activation)
    first_inputs = torch.cat([inputs, ones], 1)
    second_inputs = torch.cat([hidden, ones], 1)
    logits = second(hidden).detach()
    hessians = likelihood.natural_hessian(logits)

    def logits_of_pre_activation(s):
        return second(torch.tanh(s))

    jac_s = vmap(jacrev(logits_of_pre_activation))(pre_activation)
    expected_g1 = torch.einsum("nci,ncd,ndj->ij", jac_s, hessians, jac_s) / 6
    torch.testing.assert_close(kfac.input_factors[0], first_inputs.T @ first_inputs / 6)
    torch.testing.assert_close(kfac.input_factors[1], second_inputs.T @ second_inputs / 6)
    torch.testing.assert_close(kfac.output_factors[0], expected_g1)
    torch.testing.assert_close(kfac.output_factors[1], hessians.mean(0))


def test_mv_diag_trace_solve_agree_with_dense() -> None:
    torch.manual_seed(6)
    model = mlp().to(DTYPE)
    inputs = torch.randn(5, 3, dtype=DTYPE)
    kfac = build_kfac(model, inputs, likelihood="categorical")
    dense = kfac.to_dense()
    vector = torch.randn(dense.shape[0], dtype=DTYPE)
    torch.testing.assert_close(kfac.mv(vector), dense @ vector)
    torch.testing.assert_close(kfac.diag(), dense.diagonal())
    torch.testing.assert_close(kfac.trace(), dense.trace())
    damping = 0.1
    solution = kfac.solve(vector, damping)
    torch.testing.assert_close(kfac.mv(solution) + damping * solution, vector)
    as_list = kfac.solve(kfac.unflatten(vector), damping)
    torch.testing.assert_close(torch.cat([part.reshape(-1) for part in as_list]), solution)


def test_solve_factored_matches_dense_factored_damping() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    inputs = torch.randn(5, 3, dtype=DTYPE)
    kfac = build_kfac(model, inputs, likelihood="categorical")
    damping = 0.05
    vector = torch.randn(kfac.shape[0], dtype=DTYPE)
    solution = kfac.unflatten(kfac.solve_factored(vector, damping))
    for index, layer in enumerate(kfac.layers):
        output_factor, input_factor = kfac.output_factors[index], kfac.input_factors[index]
        pi = (
            (input_factor.trace() / len(input_factor))
            / (output_factor.trace() / len(output_factor))
        ).sqrt()
        damped = torch.kron(
            output_factor + damping**0.5 / pi * torch.eye(len(output_factor), dtype=DTYPE),
            input_factor + damping**0.5 * pi * torch.eye(len(input_factor), dtype=DTYPE),
        )
        rhs = layer.to_matrix(kfac.unflatten(vector)).reshape(-1)
        expected = torch.linalg.solve(damped, rhs).reshape(layer.output_dim, layer.input_dim)
        torch.testing.assert_close(layer.to_matrix(solution), expected)
    with pytest.raises(ValueError, match="positive"):
        kfac.solve_factored(vector, 0.0)


def explicit_patches(inputs: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Patches by explicit slicing (no unfold): shape ``(N, T, C·kh·kw)``."""
    padding = conv.padding
    padded = nn.functional.pad(inputs, (padding[1], padding[1], padding[0], padding[0]))
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    rows = (padded.shape[2] - kh) // sh + 1
    cols = (padded.shape[3] - kw) // sw + 1
    patches = [
        padded[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw].reshape(len(inputs), -1)
        for i in range(rows)
        for j in range(cols)
    ]
    return torch.stack(patches, dim=1)


def test_conv2d_factors_match_brute_force_unfold() -> None:
    torch.manual_seed(8)
    conv = nn.Conv2d(2, 3, kernel_size=(2, 3), stride=(1, 2), padding=1).to(DTYPE)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(4)).to(DTYPE)
    inputs = torch.randn(3, 2, 4, 5, dtype=DTYPE)
    model(inputs)
    likelihood = get_likelihood("categorical")
    kfac = build_kfac(model, inputs, likelihood=likelihood)

    patches = explicit_patches(inputs, conv)
    patches = torch.cat([patches, torch.ones(*patches.shape[:2], 1, dtype=DTYPE)], dim=2)
    locations = patches.shape[1]
    expected_a = torch.einsum("nti,ntj->ij", patches, patches) / (3 * locations)
    torch.testing.assert_close(kfac.input_factors[0], expected_a)

    conv_out = conv(inputs).detach()
    head = nn.Sequential(*list(model)[1:])
    jac = vmap(jacrev(lambda s: head(s.unsqueeze(0)).squeeze(0)))(conv_out)
    hessians = likelihood.natural_hessian(model(inputs).detach())
    jac = jac.reshape(3, 4, 3, locations)  # (N, C, d_out, T)
    expected_g = torch.einsum("ncot,ncd,ndpt->op", jac, hessians, jac) / 3
    torch.testing.assert_close(kfac.output_factors[0], expected_g)


@settings(max_examples=40, deadline=None)
@given(
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    padding_mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    channels=st.integers(1, 3),
    samples=st.integers(1, 3),
    channels_last=st.booleans(),
)
def test_conv_patches_equal_torch_unfold(
    kernel, stride, dilation, padding, padding_mode, channels, samples, channels_last
) -> None:
    """The strided-slice patches are ``functional.unfold``'s (after the layer's padding), for
    either memory format of the input; their means over the locations (K-FAC-reduce) are the
    means of ``functional.unfold``'s."""
    conv = nn.Conv2d(channels, 2, kernel, stride, padding, dilation, padding_mode=padding_mode)
    conv = conv.to(DTYPE)
    inputs = torch.randn(samples, channels, 6, 7, dtype=DTYPE)
    if channels_last:
        inputs = inputs.to(memory_format=torch.channels_last)
    mode = "constant" if padding_mode == "zeros" else padding_mode
    padded = nn.functional.pad(inputs, conv._reversed_padding_repeated_twice, mode=mode)
    unfolded = nn.functional.unfold(padded, kernel, dilation=dilation, stride=stride)
    patches = conv_patches(conv, inputs)
    assert patches.is_contiguous()
    torch.testing.assert_close(patches, unfolded.permute(1, 0, 2), rtol=0, atol=0)
    assert conv(inputs).shape[2:].numel() == patches.shape[2]
    torch.testing.assert_close(conv_patch_means(conv, inputs), unfolded.mean(2).T)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_conv_patches_of_asymmetric_same_padding_equal_torch_unfold(padding_mode: str) -> None:
    """``padding="same"`` with an even kernel pads one more on the right and bottom."""
    torch.manual_seed(4)
    conv = nn.Conv2d(2, 3, (2, 4), padding="same", dilation=(1, 2), padding_mode=padding_mode)
    conv = conv.to(DTYPE)
    inputs = torch.randn(3, 2, 5, 9, dtype=DTYPE)
    mode = "constant" if padding_mode == "zeros" else padding_mode
    padded = nn.functional.pad(inputs, conv._reversed_padding_repeated_twice, mode=mode)
    assert padded.shape[2:] == (6, 15)
    unfolded = nn.functional.unfold(padded, (2, 4), dilation=(1, 2))
    torch.testing.assert_close(conv_patches(conv, inputs), unfolded.permute(1, 0, 2))
    torch.testing.assert_close(conv_patch_means(conv, inputs), unfolded.mean(2).T)
    assert unfolded.shape[2] == conv(inputs).shape[2:].numel()


@settings(max_examples=30, deadline=None)
@given(
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding=st.integers(0, 2),
    padding_mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    channels=st.integers(1, 3),
    samples=st.integers(1, 3),
)
def test_conv1d_patches_equal_sliding_windows(
    kernel, stride, dilation, padding, padding_mode, channels, samples
) -> None:
    """A ``Conv1d``'s patches (and their means) against ``Tensor.unfold``'s sliding windows of
    the padded input, every ``dilation``-th element of each."""
    conv = nn.Conv1d(channels, 2, kernel, stride, padding, dilation, padding_mode=padding_mode)
    inputs = torch.randn(samples, channels, 7, dtype=DTYPE)
    mode = "constant" if padding_mode == "zeros" else padding_mode
    padded = nn.functional.pad(inputs, (padding, padding), mode=mode)
    windows = padded.unfold(2, dilation * (kernel - 1) + 1, stride)[..., ::dilation]
    expected = windows.permute(1, 3, 0, 2).reshape(channels * kernel, samples, -1)
    assert expected.shape[2] == conv.to(DTYPE)(inputs).shape[2]
    torch.testing.assert_close(conv_patches(conv, inputs), expected, rtol=0, atol=0)
    torch.testing.assert_close(conv_patch_means(conv, inputs), expected.mean(2))


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_conv1d_factors_equal_those_of_the_equivalent_conv2d(kfac_approx: str) -> None:
    """A ``Conv1d`` and the ``Conv2d`` with kernel ``(1, k)`` on the inputs with a unit height
    compute the same thing, and get the same factors."""
    torch.manual_seed(5)
    line = nn.Sequential(
        nn.Conv1d(2, 3, 3, stride=2, padding=2, dilation=2, padding_mode="reflect"),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 5, 4),
    ).to(DTYPE)
    image = nn.Sequential(
        nn.Conv2d(2, 3, (1, 3), stride=(1, 2), padding=(0, 2), dilation=(1, 2)),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 5, 4),
    ).to(DTYPE)
    image[0].padding_mode = "reflect"
    with torch.no_grad():
        image[0].weight.copy_(line[0].weight.unsqueeze(2))
        image[0].bias.copy_(line[0].bias)
        image[3].load_state_dict(line[3].state_dict())
    inputs = torch.randn(6, 2, 9, dtype=DTYPE)
    torch.testing.assert_close(line(inputs), image(inputs.unsqueeze(2)))
    options = {"likelihood": "categorical", "kfac_approx": kfac_approx}
    line_kfac = build_kfac(line, inputs, **options)
    image_kfac = fisher(image, inputs.unsqueeze(2), kind="exact", structure="kfac", **options)
    for got, expected in zip(
        line_kfac.input_factors + line_kfac.output_factors,
        image_kfac.input_factors + image_kfac.output_factors,
        strict=True,
    ):
        torch.testing.assert_close(got, expected)


def test_conv1d_covering_whole_input_is_exact_at_batch_one() -> None:
    torch.manual_seed(10)
    model = nn.Sequential(nn.Conv1d(2, 3, kernel_size=4), nn.Flatten(), nn.Tanh(), nn.Linear(3, 2))
    model = model.to(DTYPE)
    inputs = torch.randn(1, 2, 4, dtype=DTYPE)
    likelihood = get_likelihood("categorical")
    kfac = build_kfac(model, inputs, likelihood=likelihood)
    assert_blocks_equal(model, kfac, exact_fisher(model, inputs, likelihood))


def test_conv_patches_refuse_an_input_that_is_not_a_batch_of_the_layer() -> None:
    conv = nn.Conv2d(2, 3, 2)
    with pytest.raises(ValueError, match=r"layer 'features': expected a batched \(N, 2, H, W\)"):
        conv_patches(conv, torch.randn(2, 4, 4), "features")
    with pytest.raises(ValueError, match=r"got shape \(1, 3, 4, 4\)"):
        conv_patches(conv, torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"layer 'features': .* got shape \(1, 3, 4, 4\)"):
        conv_patch_means(conv, torch.randn(1, 3, 4, 4), "features")
    with pytest.raises(ValueError, match=r"expected a batched \(N, 2, L\) input, got shape"):
        conv_patches(nn.Conv1d(2, 3, 2), torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"\(d_in, N, T\), got \(4, 9\)"):
        patch_features(torch.randn(4, 9), bias=True)
    with pytest.raises(ValueError, match="4 features do not split into groups=3"):
        patch_features(torch.randn(4, 2, 9), bias=True, groups=3)
    with pytest.raises(ValueError, match="6 features do not split into groups=4"):
        grouped_output_features(torch.randn(2, 3, 6), 4)
    with pytest.raises(ValueError, match=r"\(N, T, d_out\), got \(2, 6\)"):
        grouped_output_features(torch.randn(2, 6), 2)


def test_patch_features_append_ones_for_the_bias() -> None:
    patches = torch.randn(4, 2, 3)
    features = patch_features(patches, bias=True)
    assert features.shape == (2, 3, 5)
    torch.testing.assert_close(features[..., :4], patches.permute(1, 2, 0))
    torch.testing.assert_close(features[..., 4], torch.ones(2, 3))
    torch.testing.assert_close(patch_features(patches, bias=False), patches.permute(1, 2, 0))


def test_conv2d_covering_whole_input_is_exact_at_batch_one() -> None:
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(2, 3, kernel_size=3), nn.Flatten(), nn.Tanh(), nn.Linear(3, 2))
    model = model.to(DTYPE)
    inputs = torch.randn(1, 2, 3, 3, dtype=DTYPE)
    likelihood = get_likelihood("bernoulli")
    kfac = build_kfac(model, inputs, likelihood=likelihood)
    assert_blocks_equal(model, kfac, exact_fisher(model, inputs, likelihood))


class _PooledLinear(nn.Module):
    """A Linear layer at each of the T locations of ``(N, T, 3)`` inputs, mean-pooled, and a
    Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.token(inputs)).mean(1))


def _pooled_conv() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 2), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3)
    )


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_reduce_is_exact_at_batch_one_when_the_input_repeats_over_locations(layer: str) -> None:
    """With the same input at every location, the per-sample gradient ``Σ_t g_t aᵀ`` is
    ``ĝ āᵀ``, so K-FAC-reduce's blocks are the exact Fisher blocks at batch size 1
    (Eschenhagen et al. 2023); with the locations pooled, K-FAC-expand's first block is ``1/T``
    of the exact one."""
    torch.manual_seed(12)
    if layer == "linear":
        model, locations = _PooledLinear().to(DTYPE), 5
        inputs = torch.randn(1, 1, 3, dtype=DTYPE).expand(1, locations, 3)
    else:
        model, locations = _pooled_conv().to(DTYPE), 3 * 4
        inputs = torch.randn(1, 2, 1, 1, dtype=DTYPE).expand(1, 2, 4, 5)
    likelihood = get_likelihood("categorical")
    exact = exact_fisher(model, inputs, likelihood)
    reduce = build_kfac(model, inputs, likelihood=likelihood, kfac_approx="reduce")
    assert_blocks_equal(model, reduce, exact)
    expand = build_kfac(model, inputs, likelihood=likelihood).to_dense()
    first = block_mask(model, linear_groups(model)[:1])
    torch.testing.assert_close(expand[first] * locations, exact[first])
    assert not torch.allclose(expand[first], exact[first])


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize(("kind", "curvlinops_kind"), [("exact", "type-2"), ("empirical", None)])
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_factors_equal_curvlinops(kfac_approx: str, kind: str, curvlinops_kind, layer) -> None:
    """Both approximations against curvlinops' ``KFACLinearOperator`` (an independent
    implementation of KFC and K-FAC-reduce) on a strided, padded convolution and on a Linear
    layer over sequences."""
    curvlinops = pytest.importorskip("curvlinops")
    torch.manual_seed(13)
    if layer == "linear":
        model, inputs = _PooledLinear().to(DTYPE), torch.randn(6, 5, 3, dtype=DTYPE)
    else:
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 6, 3)
        ).to(DTYPE)
        inputs = torch.randn(6, 2, 5, 4, dtype=DTYPE)
    targets = torch.randint(0, 3, (6,))
    options = {"targets": targets} if kind == "empirical" else {}
    kfac = build_kfac(
        model, inputs, likelihood="categorical", kind=kind, kfac_approx=kfac_approx, **options
    )
    reference = curvlinops.KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(),
        list(model.parameters()),
        [(inputs, targets)],
        fisher_type=curvlinops_kind or kind,
        kfac_approx=kfac_approx,
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    reference.compute_kronecker_factors()
    names = [layer.name for layer in kfac.layers]
    for index, name in enumerate(names):
        torch.testing.assert_close(kfac.input_factors[index], reference._input_covariances[name])
        torch.testing.assert_close(
            kfac.output_factors[index], reference._gradient_covariances[name]
        )


def test_model_with_other_trainable_parameters_raises_naming_them() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).to(DTYPE)
    with pytest.raises(ValueError, match=r"1\.weight"):
        build_kfac(model, torch.randn(2, 3, dtype=DTYPE), likelihood="categorical")
    model[1].requires_grad_(False)
    kfac = build_kfac(model, torch.randn(2, 3, dtype=DTYPE), likelihood="categorical")
    assert kfac.shape == (4 * 4 + 2 * 5, 4 * 4 + 2 * 5)


def test_layers_sharing_a_weight_raise_naming_them() -> None:
    """Two layers with one weight (tied): its curvature sums both uses, and the per-layer
    blocks were off by as much as the block itself even at batch one, where K-FAC is exact
    for untied layers. The per-layer diagonal falls back to the general method."""
    torch.manual_seed(3)
    tied = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    tied = tied.to(DTYPE)
    tied[2].weight = tied[0].weight
    inputs = torch.randn(6, 4, dtype=DTYPE)
    message = r"layers \['0', '2'\] share one weight"
    for structure in ("kfac", "ekfac"):
        with pytest.raises(ValueError, match=message):
            fisher(tied, inputs, likelihood="categorical", structure=structure)
    diagonal = fisher(tied, inputs, likelihood="categorical", structure="diag").diag()
    dense = fisher(tied, inputs, likelihood="categorical", structure="dense").diag()
    torch.testing.assert_close(diagonal, dense)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap fallback
@pytest.mark.parametrize("computed", ["pruned", "weight_norm"])
def test_layers_with_a_computed_weight_are_no_kronecker_layers(computed: str) -> None:
    """A pruned or parametrized weight is a tensor computed from other parameters: the
    operators looked it up among the parameters (a KeyError). Now its parameters are named as
    outside the Kronecker layers; the per-layer diagonal falls back to the general method."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DTYPE)
    if computed == "pruned":
        prune.l1_unstructured(model[0], "weight", amount=0.5)
    else:
        model[0] = weight_norm(model[0])
    inputs = torch.randn(5, 3, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"trainable parameter\(s\) \['0\.bias', '0\."):
        fisher(model, inputs, likelihood="categorical", structure="kfac")
    diagonal = fisher(model, inputs, likelihood="categorical", structure="diag").diag()
    dense = fisher(model, inputs, likelihood="categorical", structure="dense").diag()
    torch.testing.assert_close(diagonal, dense)


def test_invalid_models_and_arguments_raise() -> None:
    inputs = torch.randn(2, 3, dtype=DTYPE)
    model = nn.Linear(3, 2).to(DTYPE)
    with pytest.raises(ValueError, match="kind"):
        build_kfac(model, inputs, likelihood="gaussian", kind="fisher")
    with pytest.raises(ValueError, match="targets"):
        build_kfac(model, inputs, likelihood="gaussian", kind="empirical")
    with pytest.raises(ValueError, match="mc_samples"):
        build_kfac(model, inputs, likelihood="gaussian", kind="mc", mc_samples=0)
    with pytest.raises(ValueError, match="unknown likelihood"):
        build_kfac(model, inputs, likelihood="cauchy")
    with pytest.raises(ValueError, match=r"kfac_approx must be one of .*, got 'mean'"):
        build_kfac(model, inputs, likelihood="gaussian", kfac_approx="mean")
    with pytest.raises(ValueError, match="damping"):
        build_kfac(model, inputs, likelihood="gaussian").solve(torch.zeros(8, dtype=DTYPE), -1.0)


def test_mc_kind_converges_to_exact_kind_as_samples_grow() -> None:
    torch.manual_seed(11)
    model = mlp().to(DTYPE)
    inputs = torch.randn(3, 3, dtype=DTYPE)
    exact = build_kfac(model, inputs, likelihood="categorical").to_dense()

    def mc_error(samples: int) -> float:
        generator = torch.Generator().manual_seed(12)
        mc = build_kfac(
            model,
            inputs,
            likelihood="categorical",
            kind="mc",
            mc_samples=samples,
            generator=generator,
        ).to_dense()
        return float(torch.linalg.norm(mc - exact) / torch.linalg.norm(exact))

    many = mc_error(800)
    assert many < 0.1
    assert many < mc_error(4)


@pytest.mark.parametrize("build", [build_kfac, build_ekfac])
def test_in_place_activations_give_the_same_operator(build) -> None:
    torch.manual_seed(9)
    inputs = torch.randn(6, 3, dtype=DTYPE)
    plain = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3)).to(DTYPE)
    in_place = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 3)).to(DTYPE)
    in_place.load_state_dict(plain.state_dict())
    expected = build(plain, inputs, likelihood="categorical").to_dense()
    actual = build(in_place, inputs, likelihood="categorical").to_dense()
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_grouped_conv_covering_whole_input_is_exact_at_batch_one() -> None:
    """At batch one with one location, each group's block ``G_j ⊗ A_j`` is the exact Fisher's
    block of that group's weights and bias; the blocks between groups are left out."""
    torch.manual_seed(12)
    model = nn.Sequential(
        nn.Conv2d(4, 4, kernel_size=3, groups=2), nn.Flatten(), nn.Tanh(), nn.Linear(4, 2)
    ).to(DTYPE)
    inputs = torch.randn(1, 4, 3, 3, dtype=DTYPE)
    likelihood = get_likelihood("categorical")
    kfac = build_kfac(model, inputs, likelihood=likelihood)
    reference = exact_fisher(model, inputs, likelihood)
    group_of = torch.cat(
        [torch.arange(2).repeat_interleave(2 * 18), torch.arange(2).repeat_interleave(2)]
    )
    group_of = torch.cat([group_of, torch.full((2 * 5,), 2)])  # the Linear layer: one block
    mask = group_of.unsqueeze(1) == group_of.unsqueeze(0)
    dense = kfac.to_dense()
    torch.testing.assert_close(dense[mask], reference[mask])
    assert (dense[~mask] == 0).all()


@pytest.mark.parametrize("build", [build_kfac, build_ekfac])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize(("conv_type", "groups"), [(nn.Conv2d, 2), (nn.Conv2d, 4), (nn.Conv1d, 2)])
def test_grouped_conv_operator_is_that_of_one_conv_per_group(
    build, kfac_approx: str, conv_type: type, groups: int
) -> None:
    """The operator of a grouped (``groups = 4``: depthwise) convolution equals that of the
    same network with one ordinary convolution per group, the parameters permuted: dense
    matrix, diagonal, products and solves (factored too)."""
    torch.manual_seed(13)
    spatial = (4,) if conv_type is nn.Conv1d else (4, 4)
    model = nn.Sequential(
        conv_type(4, 4, 3, padding=1, groups=groups),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * math.prod(spatial), 3),
    ).to(DTYPE)
    twin = split_twin(model)
    positions = twin_positions(model)
    # more samples than any factor's dimension: no repeated (zero) eigenvalue, whose basis
    # (on which EKFAC's eigenvalues depend) round-off would choose
    inputs = torch.randn(24, 4, *spatial, dtype=DTYPE)
    options = {"likelihood": "categorical", "kfac_approx": kfac_approx}
    operator, twin_operator = build(model, inputs, **options), build(twin, inputs, **options)
    dense = twin_operator.to_dense()
    torch.testing.assert_close(operator.to_dense(), dense[positions][:, positions])
    torch.testing.assert_close(operator.diag(), twin_operator.diag()[positions])
    vector = torch.randn(len(positions), dtype=DTYPE)
    twin_vector = torch.empty_like(vector)
    twin_vector[positions] = vector
    torch.testing.assert_close(operator.mv(vector), twin_operator.mv(twin_vector)[positions])
    torch.testing.assert_close(
        operator.solve(vector, 0.1), twin_operator.solve(twin_vector, 0.1)[positions]
    )
    if build is build_kfac:
        torch.testing.assert_close(
            operator.solve_factored(vector, 0.1),
            twin_operator.solve_factored(twin_vector, 0.1)[positions],
        )


class _TiedEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(3, 2)
        self.output = nn.Linear(2, 3, bias=False)
        self.output.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.output(torch.tanh(self.embedding(tokens)))


class _TiedBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(2, 3), nn.Linear(3, 3)
        self.second.bias = self.first.bias

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(inputs)))


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
@pytest.mark.parametrize("tied", ["embedding", "bias"])
def test_parameter_tied_to_another_module_raises_naming_both(structure: str, tied: str) -> None:
    """Weight tying (an embedding and an output layer, two layers' biases): the block of the
    layer holding the parameter misses the other uses (at batch size 1 the diagonal was off by
    0.2); the builders refuse instead of returning a wrong block."""
    torch.manual_seed(0)
    if tied == "embedding":
        model, inputs, names = _TiedEmbedding().to(DTYPE), torch.tensor([1]), "embedding.weight"
    else:
        model, inputs, names = _TiedBias().to(DTYPE), torch.randn(1, 2, dtype=DTYPE), "first.bias"
    with pytest.raises(ValueError, match=f"{names}.*tied parameter"):
        fisher(model, inputs, likelihood="categorical", structure=structure)
    with pytest.raises(ValueError, match="tied parameter"):
        (build_kfac if structure == "kfac" else build_ekfac)(
            model, inputs, likelihood="categorical"
        )


@pytest.mark.parametrize("build", [build_kfac, build_ekfac])
def test_non_finite_factors_raise_naming_the_layer(build) -> None:
    """A NaN weight made every factor NaN: K-FAC's mv, diag and dense matrix were NaN without
    a word (only its solve raised, about an eigendecomposition)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 3)).to(DTYPE)
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    inputs = torch.randn(4, 2, dtype=DTYPE)
    with pytest.raises(ValueError, match="factors of layer '0' are not finite"):
        build(model, inputs, likelihood="categorical")
