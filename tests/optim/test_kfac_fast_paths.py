"""The cheap code paths of the K-FAC preconditioner against independent oracles.

Statistics are recorded only on factor-update steps, into buffers reused between steps and
folded in place; solutions are written straight into ``.grad`` (or copied where ``.grad`` has
another layout or dtype); eigendecompositions are batched by factor size; the KL-clipping
scale stays on the device. Each is checked against brute-force per-sample quantities from
``torch.func`` in float64, a dense solve, or the one-matrix decomposition.
"""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import grad, vmap

from kfac_training import fisher_options
from natgrad.linalg.kron import symmetric_eigh, symmetric_eigh_batch
from natgrad.optim import KFAC
from natgrad.optim.kfac import _device_kl_scale

DTYPE = torch.float64


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3, bias=False)).to(DTYPE)


def sample_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.unsqueeze(0), target.unsqueeze(0))


def oracle_factors(model: nn.Sequential, inputs, targets) -> list[tuple[torch.Tensor, ...]]:
    """``(G, A)`` of each Linear layer from per-sample layer inputs and per-sample output
    gradients of each sample's own loss (``torch.func``), mean over samples."""
    factors = []
    for index, layer in enumerate(model):
        if not isinstance(layer, nn.Linear):
            continue
        with torch.no_grad():
            layer_inputs = model[:index](inputs)
            outputs = layer(layer_inputs)
        rest = model[index + 1 :]
        output_grads = vmap(grad(lambda z, y, rest=rest: sample_nll(rest(z), y)))(outputs, targets)
        if layer.bias is not None:
            layer_inputs = torch.cat([layer_inputs, torch.ones(len(inputs), 1, dtype=DTYPE)], 1)
        input_factor = layer_inputs.T @ layer_inputs / len(inputs)
        output_factor = output_grads.T @ output_grads / len(inputs)
        factors.append((output_factor, input_factor))
    return factors


def batch(seed: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(size, 3, generator=generator, dtype=DTYPE),
        torch.randint(0, 3, (size,), generator=generator),
    )


@settings(max_examples=4, deadline=None)
@given(interval=st.integers(1, 3), accumulation=st.sampled_from([1, 2]), seed=st.integers(0, 99))
def test_factors_are_the_ema_of_update_step_batches_only(
    interval: int, accumulation: int, seed: int
) -> None:
    """Steps not divisible by ``factor_update_interval`` record nothing; update steps fold the
    batch's brute-force factors (micro-batches of an accumulated step combined)."""
    torch.manual_seed(seed)
    model = mlp()
    reference = copy.deepcopy(model)  # the oracle's parameters: the optimizer never steps
    decay = 0.7
    precond = KFAC(
        model,
        factor_decay=decay,
        factor_update_interval=interval,
        inv_update_interval=100,
        accumulation_steps=accumulation,
    )
    expected: list[list[torch.Tensor]] | None = None
    for step in range(7):
        inputs, targets = batch(seed + step)
        model.zero_grad()
        for part in torch.chunk(torch.arange(len(inputs)), accumulation):
            loss = nn.functional.cross_entropy(model(inputs[part]), targets[part])
            (loss / accumulation).backward()
        precond.step()
        if step % interval == 0:
            fresh = oracle_factors(reference, inputs, targets)
            expected = (
                [list(pair) for pair in fresh]
                if expected is None
                else [
                    [decay * old + (1 - decay) * new for old, new in zip(olds, news, strict=True)]
                    for olds, news in zip(expected, fresh, strict=True)
                ]
            )
        for state, (output_factor, input_factor) in zip(precond.layers, expected, strict=True):
            torch.testing.assert_close(state.output_factor, output_factor)
            torch.testing.assert_close(state.input_factor, input_factor)


def dense_block_solve(model: nn.Module, precond: KFAC, gradients, damping: float):
    """``(G ⊗ A + λI)⁻¹ g`` per layer from the preconditioner's own factors, densely."""
    solutions = []
    for state, gradient in zip(precond.layers, gradients, strict=True):
        block = torch.kron(state.output_factor, state.input_factor)
        solutions.append(
            torch.linalg.solve(block + damping * torch.eye(len(block), dtype=DTYPE), gradient)
        )
    return solutions


def layer_gradients(model: nn.Module, precond: KFAC) -> list[torch.Tensor]:
    return [state.grad_matrix().reshape(-1).clone() for state in precond.layers]


@pytest.mark.parametrize("kl_clip", [None, 1e-4])
def test_conv_channels_last_grad_takes_the_copy_path_and_equals_dense_solve(kl_clip) -> None:
    """A channels-last weight gradient is not a row-major matrix view: the solution is copied
    into it, and equals the contiguous model's and the dense block solve (scaled by ν)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4, 3)).to(
        DTYPE
    )
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    inputs = torch.randn(5, 2, 3, 3, dtype=DTYPE)
    targets = torch.randint(0, 3, (5,))
    options = {"factor_decay": 0.0, "inv_update_interval": 1, "damping": 0.1}
    if kl_clip is not None:
        options |= {"kl_clip": kl_clip, "lr": 0.5}
    results = []
    for net in (model, channels_last):
        precond = KFAC(net, **options)
        net.zero_grad()
        nn.functional.cross_entropy(net(inputs), targets).backward()
        gradients = layer_gradients(net, precond)
        precond.step()
        results.append([p.grad.contiguous() for p in net.parameters()])
    assert not channels_last[0].weight.grad.is_contiguous()
    for expected, actual in zip(*results, strict=True):
        torch.testing.assert_close(actual, expected)
    solutions = dense_block_solve(model, precond, gradients, 0.1)
    scale = 1.0
    if kl_clip is not None:
        product = sum(float(g @ d) for g, d in zip(gradients, solutions, strict=True))
        scale = min(1.0, (kl_clip / (0.5**2 * product)) ** 0.5)
        assert scale < 1
    for state, solution in zip(precond.layers, solutions, strict=True):
        torch.testing.assert_close(state.grad_matrix().reshape(-1), scale * solution)


def dense_block(state, damping: float, factored: bool) -> torch.Tensor:
    """The damped block that the preconditioner inverts, from its own factors: ``G ⊗ A + λI``
    or, factored, ``(G + λ_G I) ⊗ (A + λ_A I)`` with Martens & Grosse's π from the traces."""
    output_factor = state.output_factor
    input_factor = state.input_factor
    if input_factor.ndim == 1:
        input_factor = torch.diag(input_factor)
    if not factored:
        block = torch.kron(output_factor, input_factor)
        return block + damping * torch.eye(len(block), dtype=DTYPE)
    mean_input = torch.trace(input_factor) / len(input_factor)
    mean_output = torch.trace(output_factor) / len(output_factor)
    pi = float(torch.sqrt(mean_input / mean_output))
    output_damping, input_damping = damping**0.5 / pi, damping**0.5 * pi
    return torch.kron(
        output_factor + output_damping * torch.eye(len(output_factor), dtype=DTYPE),
        input_factor + input_damping * torch.eye(len(input_factor), dtype=DTYPE),
    )


@pytest.mark.parametrize("damping_mode", ["eigen", "factored"])
def test_embedding_and_linear_layers_with_kl_clip_equal_scaled_dense_solves(damping_mode) -> None:
    """Every layer kind (Embedding, Linear with and without bias) in both damping modes:
    ``.grad`` becomes ``ν · block⁻¹ g`` with one ``ν`` from all layers' ``Σ g · block⁻¹ g``."""
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Embedding(6, 3), nn.Flatten(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3, bias=False)
    ).to(DTYPE)
    inputs = torch.randint(0, 6, (9, 2))
    targets = torch.randint(0, 3, (9,))
    lr, kl_clip, damping = 0.5, 1e-5, 0.05
    precond = KFAC(
        model,
        factor_decay=0.0,
        inv_update_interval=1,
        damping=damping,
        damping_mode=damping_mode,
        kl_clip=kl_clip,
        lr=lr,
    )
    nn.functional.cross_entropy(model(inputs), targets).backward()
    gradients = layer_gradients(model, precond)
    precond.step()
    factored = damping_mode == "factored"
    solutions = [
        torch.linalg.solve(dense_block(state, damping, factored), gradient)
        for state, gradient in zip(precond.layers, gradients, strict=True)
    ]
    product = sum(float(g @ d) for g, d in zip(gradients, solutions, strict=True))
    scale = min(1.0, (kl_clip / (lr**2 * product)) ** 0.5)
    assert scale < 1
    for state, solution in zip(precond.layers, solutions, strict=True):
        torch.testing.assert_close(state.grad_matrix().reshape(-1), scale * solution)


@pytest.mark.parametrize("damping_mode", ["eigen", "factored"])
def test_low_precision_parameters_take_the_copy_path(damping_mode) -> None:
    """bfloat16 gradients with float32 factors: solved in float32, written back in bfloat16,
    matching the float32 model's preconditioned gradient to bfloat16 precision."""
    torch.manual_seed(4)
    reference = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).float()
    model = copy.deepcopy(reference).to(torch.bfloat16)
    inputs, targets = torch.randn(16, 3), torch.randint(0, 3, (16,))
    for net, x in ((reference, inputs), (model, inputs.to(torch.bfloat16))):
        precond = KFAC(net, inv_update_interval=1, damping=0.1, damping_mode=damping_mode)
        net.zero_grad()
        nn.functional.cross_entropy(net(x).float(), targets).backward()
        precond.step()
        assert precond.layers[0].input_factor.dtype == torch.float32
    for param, expected in zip(model.parameters(), reference.parameters(), strict=True):
        assert param.grad.dtype == torch.bfloat16
        torch.testing.assert_close(param.grad.float(), expected.grad, rtol=0.1, atol=0.05)


def test_zero_gradient_with_kl_clip_stays_zero_and_finite() -> None:
    """``Σ g·d = 0``: the device-side scale is 1 (not ``inf`` or NaN)."""
    model = mlp()
    precond = KFAC(model, inv_update_interval=1, damping=0.1, kl_clip=1e-3, lr=0.1)
    inputs, targets = batch(5)
    nn.functional.cross_entropy(model(inputs), targets).backward()
    for param in model.parameters():
        param.grad.zero_()
    precond.step()
    for param in model.parameters():
        assert torch.equal(param.grad, torch.zeros_like(param))


def test_zero_learning_rate_leaves_the_solution_unclipped() -> None:
    torch.manual_seed(6)
    model = mlp()
    clipped_model = copy.deepcopy(model)
    inputs, targets = batch(6)
    for net, options in ((model, {}), (clipped_model, {"kl_clip": 1e-9, "lr": 0.0})):
        precond = KFAC(net, inv_update_interval=1, damping=0.1, **options)
        nn.functional.cross_entropy(net(inputs), targets).backward()
        precond.step()
    for expected, actual in zip(model.parameters(), clipped_model.parameters(), strict=True):
        torch.testing.assert_close(actual.grad, expected.grad, rtol=0, atol=0)


def random_psd(size: int, seed: int, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(size + 2, size, generator=generator, dtype=dtype)
    return factor.T @ factor / (size + 2)


def test_symmetric_eigh_batch_equals_one_by_one_decompositions() -> None:
    """Groups of equal size and dtype are decomposed together; results come back in order and
    equal :func:`symmetric_eigh` of each matrix (eigenvectors up to sign)."""
    matrices = [
        random_psd(4, 0),
        random_psd(3, 1),
        random_psd(4, 2),
        random_psd(4, 3, torch.float32),
        random_psd(1, 4),
    ]
    batched = symmetric_eigh_batch(matrices)
    assert len(batched) == len(matrices)
    for matrix, eigen in zip(matrices, batched, strict=True):
        single = symmetric_eigh(matrix)
        assert eigen.values.dtype == matrix.dtype and eigen.vectors.shape == matrix.shape
        torch.testing.assert_close(eigen.values, single.values)
        signs = torch.sign((eigen.vectors * single.vectors).sum(0))
        torch.testing.assert_close(eigen.vectors * signs, single.vectors)
        reconstructed = eigen.vectors @ torch.diag(eigen.values) @ eigen.vectors.T
        torch.testing.assert_close(reconstructed, matrix)
    assert symmetric_eigh_batch([]) == []


def test_symmetric_eigh_batch_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="square"):
        symmetric_eigh_batch([random_psd(3, 0), torch.zeros(2, 3)])
    broken = random_psd(3, 1)
    broken[0, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        symmetric_eigh_batch([random_psd(3, 0), broken])


def test_forward_hooks_are_attached_only_for_recording_steps() -> None:
    """With ``factor_update_interval=3`` the model runs hook-free on steps 1, 2, 4, 5, ...;
    ``load_state_dict`` re-attaches for a recording step and ``remove`` detaches for good."""
    model = mlp()
    precond = KFAC(model, factor_update_interval=3, inv_update_interval=3)
    attached = []
    for step in range(7):
        attached.append(all(len(layer._forward_hooks) == 1 for layer in (model[0], model[2])))
        inputs, targets = batch(step)
        model.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        precond.step()
    assert attached == [True, False, False, True, False, False, True]
    assert not model[0]._forward_hooks  # step 7 does not record
    saved = copy.deepcopy(precond.state_dict())
    saved["steps"] = 9
    precond.load_state_dict(saved)
    assert len(model[0]._forward_hooks) == 1
    precond.remove()
    assert not model[0]._forward_hooks
    precond.load_state_dict(saved)
    assert not model[0]._forward_hooks


def test_mc_output_hooks_are_removed_after_sampling() -> None:
    """After :meth:`KFAC.sample_backward` the layer outputs carry no gradient hook, so the loss
    backward runs without calls into Python; the factors are those of the sampling pass."""
    torch.manual_seed(8)
    model = mlp()
    inputs, targets = batch(8)
    precond = KFAC(model, **fisher_options("mc", seed=0), inv_update_interval=1)
    layer_outputs = []
    for state in precond.layers:  # hooks after K-FAC's: they see its gradient hooks
        state.module.register_forward_hook(lambda _, __, output: layer_outputs.append(output))
    outputs = model(inputs)
    assert len(layer_outputs) == 2 and all(t._backward_hooks for t in layer_outputs)
    precond.sample_backward(outputs)
    assert not any(t._backward_hooks for t in layer_outputs)
    sampled = [state.output_sum.clone() for state in precond.layers]
    nn.functional.cross_entropy(outputs, targets).backward()
    for state, expected in zip(precond.layers, sampled, strict=True):
        torch.testing.assert_close(state.output_sum, expected, rtol=0, atol=0)


def test_eigh_finiteness_checks_accept_finite_matrices_whose_sums_overflow() -> None:
    """The cheap finiteness check (a sum) overflows for entries near float32's maximum; the
    exact elementwise check then decides, so such a matrix is still decomposed."""
    matrix = 1e38 * torch.eye(4, dtype=torch.float32)
    for eigen in (symmetric_eigh(matrix), *symmetric_eigh_batch([matrix, matrix])):
        torch.testing.assert_close(eigen.values, torch.full((4,), 1e38))
        assert torch.isfinite(eigen.vectors).all()
    infinite = matrix.clone()
    infinite[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        symmetric_eigh_batch([infinite])


@pytest.mark.parametrize("products", [[0.0], [1e-9], [2.5, -40.0], [1e30, 3.0, 0.5]])
@pytest.mark.parametrize("rates", ["zero", "shared", "per-layer"])
def test_device_kl_scale_is_the_clipping_formula_without_host_sync(products, rates) -> None:
    """The accelerator path: ``min(1, sqrt(kl_clip / |Σ_l lr_l² p_l|))`` as a 0-dim tensor
    (1 where the sum is 0), nothing to scale where every ``lr_l = 0``; evaluated here on CPU
    tensors."""
    kl_clip = 1e-2
    squares = {
        "zero": [0.0] * len(products),
        "shared": [0.09] * len(products),
        "per-layer": [0.09 * (index + 1) for index in range(len(products))],
    }[rates]
    tensors = [torch.tensor(product, dtype=DTYPE) for product in products]
    scale = _device_kl_scale(tensors, squares, kl_clip)
    if rates == "zero":
        assert scale is None
        return
    curvature = abs(
        sum(product * square for product, square in zip(products, squares, strict=True))
    )
    expected = 1.0 if curvature == 0 else min(1.0, (kl_clip / curvature) ** 0.5)
    assert scale.ndim == 0
    torch.testing.assert_close(scale, torch.tensor(expected, dtype=DTYPE))
