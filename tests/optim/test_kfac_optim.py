"""K-FAC/EKFAC preconditioners against dense natural gradients and the curvature operators."""

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

from devices import DEVICES
from kfac_training import fisher_options
from natgrad.curvature import fisher
from natgrad.curvature.ekfac import build_ekfac
from natgrad.curvature.kfac import build_kfac
from natgrad.curvature.likelihoods import get_likelihood
from natgrad.optim import EKFAC, KFAC

DTYPE = torch.float64


def flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()


def backward(model, inputs, targets) -> None:
    model.zero_grad()
    nn.functional.cross_entropy(model(inputs), targets).backward()


def mc_kfac(model: nn.Module, seed: int, **options) -> KFAC:
    """K-FAC with the Monte-Carlo Fisher of a categorical likelihood, seeded."""
    return KFAC(model, **fisher_options("mc", seed), **options)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3, bias=False)).to(DTYPE)


def convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 16, 3)
    ).to(DTYPE)


def conv1d_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4, 3)
    ).to(DTYPE)


def grouped_convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 2, padding=1, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 16, 3)
    ).to(DTYPE)


INPUT_SHAPES = {mlp: (3,), convnet: (1, 3, 3), conv1d_net: (2, 7), grouped_convnet: (2, 3, 3)}


def empirical_operator(build, model, inputs, targets, kfac_approx: str):
    """The curvature operator (``build_kfac`` or ``build_ekfac``) of the empirical Fisher of
    the cross-entropy on one batch."""
    return build(
        model,
        inputs,
        likelihood="categorical",
        kind="empirical",
        targets=targets,
        kfac_approx=kfac_approx,
    )


def per_sample_gradients(model, inputs, targets) -> dict[str, torch.Tensor]:
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p, x, y):
        logits = functional_call(model, p, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, y.unsqueeze(0))

    return vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, inputs, targets)


def test_batch_one_preconditioned_grad_is_dense_block_natural_gradient() -> None:
    """At batch size 1 each layer's empirical Fisher block is exactly ``G ⊗ A``."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(5, 3), nn.Flatten(), nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)
    ).to(DTYPE)
    inputs, targets = torch.tensor([[2]]), torch.tensor([1])
    damping = 0.05
    precond = KFAC(model, factor_decay=0.0, inv_update_interval=1, damping=damping)
    backward(model, inputs, targets)
    precond.step()
    precond.remove()
    gradients = per_sample_gradients(model, inputs, targets)
    groups = [["0.weight"], ["2.weight", "2.bias"], ["4.weight", "4.bias"]]
    params = dict(model.named_parameters())
    for group in groups:
        sample_grad = torch.cat([gradients[name].reshape(-1) for name in group])
        block = torch.outer(sample_grad, sample_grad)
        expected = torch.linalg.solve(block + damping * torch.eye(len(block)), sample_grad)
        actual = torch.cat([params[name].grad.reshape(-1) for name in group])
        torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("make_model", [mlp, convnet, conv1d_net])
@pytest.mark.parametrize("damping_mode", ["eigen", "factored"])
def test_matches_kfac_operator_solve(make_model, damping_mode: str, kfac_approx: str) -> None:
    torch.manual_seed(1)
    model = make_model()
    inputs = torch.randn(6, *INPUT_SHAPES[make_model], dtype=DTYPE)
    targets = torch.randint(0, 3, (6,))
    precond = KFAC(
        model,
        factor_decay=0.0,
        inv_update_interval=1,
        damping=0.1,
        damping_mode=damping_mode,
        kfac_approx=kfac_approx,
    )
    backward(model, inputs, targets)
    gradient = flat_grads(model)
    precond.step()
    operator = empirical_operator(build_kfac, model, inputs, targets, kfac_approx)
    solve = operator.solve if damping_mode == "eigen" else operator.solve_factored
    torch.testing.assert_close(flat_grads(model), solve(gradient, 0.1))


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_factors_equal_brute_force_unfold(bias: bool, kfac_approx: str) -> None:
    """The recorded conv input factor against ``functional.unfold`` patches (ones appended for a
    bias), the output factor against the output gradients, both summed over two steps; with
    K-FAC-reduce the patches averaged and the gradients summed over each sample's locations."""
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, (2, 3), stride=(2, 1), dilation=(1, 2), padding=(1, 2), bias=bias)
    conv.padding_mode = "reflect"
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).to(DTYPE)
    batches = [torch.randn(4, 2, 5, 6, dtype=DTYPE) for _ in range(2)]
    model(batches[0])
    precond = KFAC(
        model, factor_decay=0.5, inv_update_interval=1, damping=0.1, kfac_approx=kfac_approx
    )
    reduce = kfac_approx == "reduce"
    expected_inputs, expected_outputs = [], []
    for inputs in batches:
        model.zero_grad()
        outputs = model[0](inputs)
        outputs.retain_grad()
        targets = torch.randint(0, 3, (4,))
        nn.functional.cross_entropy(model[1:](outputs), targets).backward()
        precond.step()
        padded = nn.functional.pad(inputs, conv._reversed_padding_repeated_twice, mode="reflect")
        patches = nn.functional.unfold(padded, (2, 3), dilation=(1, 2), stride=(2, 1))
        patches = patches.mean(2, keepdim=True) if reduce else patches
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        if bias:
            rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=DTYPE)], dim=1)
        expected_inputs.append(rows.T @ rows / len(rows))
        grads = outputs.grad.flatten(2).transpose(1, 2) * len(inputs)
        grads = grads.sum(1) if reduce else grads.reshape(-1, 3)
        expected_outputs.append(grads.T @ grads / len(inputs))
    precond.remove()
    state = precond.layers[0]
    torch.testing.assert_close(state.input_factor, 0.5 * sum(expected_inputs))
    torch.testing.assert_close(state.output_factor, 0.5 * sum(expected_outputs))


def test_an_unbatched_conv_input_raises_naming_the_layer() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Flatten(0), nn.Linear(2 * 4, 3))
    precond = KFAC(model)
    with pytest.raises(ValueError, match=r"layer '0': expected a batched \(N, 1, H, W\) input"):
        model(torch.randn(1, 3, 3))
    precond.remove()


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_an_unbatched_linear_input_raises_naming_the_layer(kfac_approx: str) -> None:
    """A 1-d input reached an unrelated reshape error inside the preconditioner's hook."""
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    message = r"layer '0': expected a batched \(N, \.\.\., 5\) input, got shape \(5,\)"
    precond = KFAC(model, kfac_approx=kfac_approx)
    with pytest.raises(ValueError, match=message):
        model(torch.randn(5))
    precond.remove()
    with pytest.raises(ValueError, match=r"layer '\d'.* input"):
        fisher(model, torch.randn(5), likelihood="categorical", structure="kfac")


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("sequences", [False, True])
def test_ekfac_matches_ekfac_operator_solve(kfac_approx: str, sequences: bool) -> None:
    torch.manual_seed(2)
    if sequences:
        model, inputs = _SequenceClassifier(), torch.randn(7, 5, 3, dtype=DTYPE)
    else:
        # unpadded, so that the kernel offsets average different windows: otherwise reduce's A
        # is singular and EKFAC's eigenvalues in its null space depend on the eigensolver
        model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 9, 3))
        model, inputs = model.to(DTYPE), torch.randn(7, 1, 4, 4, dtype=DTYPE)
    targets = torch.randint(0, 2, (7,))
    precond = EKFAC(
        model, factor_decay=0.0, inv_update_interval=1, damping=0.1, kfac_approx=kfac_approx
    )
    backward(model, inputs, targets)
    gradient = flat_grads(model)
    precond.step()
    operator = empirical_operator(build_ekfac, model, inputs, targets, kfac_approx)
    torch.testing.assert_close(flat_grads(model), operator.solve(gradient, 0.1))


@pytest.mark.parametrize("restart", ["batch", "kfac"])
def test_ekfac_eigenvalue_restart_mixes_the_kfac_and_ekfac_blocks(restart: str) -> None:
    """At a refresh the EKFAC eigenvalues restart from the batch estimate alone, or from
    ``ω S_K-FAC + (1 − ω) S_batch``; both blocks are diagonal in the same Kronecker eigenbasis,
    so the step solves with ``ω K + (1 − ω) E`` built densely from the curvature operators."""
    torch.manual_seed(2)
    model = convnet()
    inputs, targets = torch.randn(5, 1, 3, 3, dtype=DTYPE), torch.randint(0, 3, (5,))
    decay, damping = 0.6, 0.1
    precond = EKFAC(
        model,
        factor_decay=decay,
        inv_update_interval=1,
        damping=damping,
        eigenvalue_restart=restart,
    )
    backward(model, inputs, targets)
    gradient = flat_grads(model)
    precond.step()
    options = {"likelihood": "categorical", "kind": "empirical", "targets": targets}
    kfac = build_kfac(model, inputs, **options).to_dense()
    ekfac = build_ekfac(model, inputs, **options).to_dense()
    weight = decay if restart == "kfac" else 0.0
    curvature = (
        weight * kfac + (1 - weight) * ekfac + damping * torch.eye(len(gradient), dtype=DTYPE)
    )
    torch.testing.assert_close(flat_grads(model), torch.linalg.solve(curvature, gradient))


def test_ekfac_rejects_an_unknown_eigenvalue_restart() -> None:
    with pytest.raises(ValueError, match="eigenvalue_restart"):
        EKFAC(mlp(), eigenvalue_restart="kfac-prior")


def test_mc_fisher_matches_mc_operator_with_same_generator_seed() -> None:
    torch.manual_seed(3)
    model = mlp()
    inputs, targets = torch.randn(4, 3, dtype=DTYPE), torch.randint(0, 3, (4,))
    precond = mc_kfac(model, 7, factor_decay=0.0, inv_update_interval=1, damping=0.1)
    model.zero_grad()
    outputs = model(inputs)
    precond.sample_backward(outputs)
    nn.functional.cross_entropy(outputs, targets).backward()
    gradient = flat_grads(model)
    precond.step()
    operator = build_kfac(
        model,
        inputs,
        likelihood="categorical",
        kind="mc",
        generator=torch.Generator().manual_seed(7),
    )
    torch.testing.assert_close(flat_grads(model), operator.solve(gradient, 0.1))


def train(model, precond, optimizer, batches) -> None:
    for inputs, targets in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        if precond is not None:
            precond.step()
        optimizer.step()


def batches(count: int, seed: int = 0, shape: tuple[int, ...] = (3,)) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(8, *shape, generator=generator, dtype=DTYPE),
            torch.randint(0, 3, (8,), generator=generator),
        )
        for _ in range(count)
    ]


def test_before_start_step_it_is_exactly_the_base_optimizer() -> None:
    torch.manual_seed(4)
    reference = mlp()
    model = copy.deepcopy(reference)
    train(
        reference, None, torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9), batches(6)
    )
    precond = KFAC(model, start_step=100, inv_update_interval=2)
    train(model, precond, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), batches(6))
    for expected, actual in zip(reference.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert precond.layers[0].input_factor is not None


def test_huge_damping_with_scaled_lr_reduces_to_the_base_optimizer() -> None:
    torch.manual_seed(5)
    reference = mlp()
    model = copy.deepcopy(reference)
    damping = 1e8
    train(reference, None, torch.optim.SGD(reference.parameters(), lr=0.1), batches(5))
    precond = KFAC(model, damping=damping, inv_update_interval=1)
    train(model, precond, torch.optim.SGD(model.parameters(), lr=0.1 * damping), batches(5))
    for expected, actual in zip(reference.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_state_dict_round_trip_resumes_identically(cls, device: str) -> None:
    """Saved on the CPU, resumed on ``device``: like ``torch.optim``'s, the loaded state moves
    to the parameters' device (exactly the same run on the CPU)."""
    torch.manual_seed(6)
    data = batches(10, seed=1, shape=(1, 3, 3) if cls is EKFAC else (3,))
    model = convnet() if cls is EKFAC else mlp()
    options = {"factor_decay": 0.8, "inv_update_interval": 3, "damping": 0.01}
    precond = cls(model, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train(model, precond, optimizer, data[:5])
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))
    saved_precond = copy.deepcopy(precond.state_dict())
    train(model, precond, optimizer, data[5:])

    resumed = (convnet() if cls is EKFAC else mlp()).to(device)
    resumed.load_state_dict(saved[0])
    resumed_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9)
    resumed_optimizer.load_state_dict(saved[1])
    resumed_precond = cls(resumed, **options)
    resumed_precond.load_state_dict(saved_precond)
    assert resumed_precond.steps == 5
    assert resumed_precond.layers[0].input_factor.device.type == device
    rest = [(inputs.to(device), targets.to(device)) for inputs, targets in data[5:]]
    train(resumed, resumed_precond, resumed_optimizer, rest)
    exact = device == "cpu"
    tolerance = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-6, "atol": 1e-8}
    for expected, actual in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(actual.cpu(), expected, **tolerance)
    if not exact:
        return
    for name, state in precond.state_dict()["layers"].items():
        for key, value in state.items():
            other = resumed_precond.state_dict()["layers"][name][key]
            assert (value is None and other is None) or torch.equal(value, other)


def test_mc_state_round_trip_resumes_with_the_same_samples() -> None:
    """The generator's state is part of the state: a resumed Monte-Carlo K-FAC draws the
    targets that the uninterrupted run draws."""

    def run(model, precond, optimizer, data) -> None:
        for inputs, targets in data:
            optimizer.zero_grad()
            outputs = model(inputs)
            precond.sample_backward(outputs)
            nn.functional.cross_entropy(outputs, targets).backward()
            precond.step()
            optimizer.step()

    def build(model):
        precond = mc_kfac(model, seed=0, inv_update_interval=2, damping=0.01)
        return precond, torch.optim.SGD(model.parameters(), lr=0.1)

    data = batches(6, seed=4)
    model = mlp()
    precond, optimizer = build(model)
    run(model, precond, optimizer, data[:3])
    saved = copy.deepcopy((model.state_dict(), precond.state_dict()))
    run(model, precond, optimizer, data[3:])
    resumed = mlp()
    resumed.load_state_dict(saved[0])
    resumed_precond, resumed_optimizer = build(resumed)
    resumed_precond.load_state_dict(saved[1])
    run(resumed, resumed_precond, resumed_optimizer, data[3:])
    for expected, actual in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def _train_with_loss_scaling(model, grad_scaler: str | None) -> list[torch.Tensor]:
    """5 steps of K-FAC + SGD on a loss scaled by a ``GradScaler`` (``2¹²``, growing every
    2 steps); the preconditioner gets the scaler, a function of its scale, or nothing."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    options = {"scaler": scaler, "function": scaler.get_scale, None: None}
    precond = KFAC(model, inv_update_interval=1, damping=0.01, grad_scaler=options[grad_scaler])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for inputs, targets in batches(5, seed=2):
        optimizer.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(inputs), targets)).backward()
        scaler.unscale_(optimizer)
        precond.step()
        scaler.step(optimizer)
        scaler.update()
    assert scaler.get_scale() == 2.0**14
    return [param.detach().clone() for param in model.parameters()]


def test_loss_scaling_with_the_grad_scaler_equals_unscaled_training() -> None:
    """The recorded output gradients are divided by the (changing) loss scale: the run equals
    one without loss scaling, to round-off (powers of two scale exactly)."""
    torch.manual_seed(11)
    reference = mlp()
    models = {key: copy.deepcopy(reference) for key in ("scaler", "function", None)}
    train(
        reference,
        KFAC(reference, inv_update_interval=1, damping=0.01),
        torch.optim.SGD(reference.parameters(), lr=0.1),
        batches(5, seed=2),
    )
    expected = list(reference.parameters())
    for key in ("scaler", "function"):
        for param, target in zip(_train_with_loss_scaling(models[key], key), expected, strict=True):
            torch.testing.assert_close(param, target, rtol=1e-12, atol=1e-14)
    unaware = _train_with_loss_scaling(models[None], None)
    assert max((a - b).abs().max() for a, b in zip(unaware, expected, strict=True)) > 1e-3
    with pytest.raises(TypeError, match="grad_scaler"):
        KFAC(mlp(), grad_scaler=2.0**12)


def test_an_overflowing_loss_scale_skips_the_factor_update_without_a_warning() -> None:
    """float16 gradients of a loss scaled by 2²⁰ overflow: the scaler skips the step and backs
    off, K-FAC skips the factor update, and neither warns (it is routine with a scaler)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    precond = KFAC(model, damping=0.01, grad_scaler=scaler)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, targets = torch.randn(8, 3), torch.randint(0, 3, (8,))
    with torch.autocast("cpu", dtype=torch.float16):
        outputs = model(inputs)
    scaler.scale(nn.functional.cross_entropy(outputs.float(), targets)).backward()
    scaler.unscale_(optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precond.step()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**19  # the scaler saw the overflow
    assert precond.layers[0].input_factor is None  # and nothing was folded in


class _SequenceClassifier(nn.Module):
    """A Linear layer applied at every position of ``(N, T, 3)`` inputs, then mean-pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Linear(3, 4).to(DTYPE)
        self.head = nn.Linear(4, 2).to(DTYPE)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.token(inputs)).mean(1))


def test_linear_layer_over_sequences_uses_the_per_position_factors() -> None:
    """For ``(N, T, d)`` inputs ``A`` averages ``a aᵀ`` over samples and positions and ``G`` sums
    ``g gᵀ`` over positions and averages over samples (as for convolutions); the step is
    ``(G ⊗ A + λI)⁻¹ vec(∇W)``."""
    torch.manual_seed(0)
    model = _SequenceClassifier()
    samples, positions, damping = 5, 6, 0.1
    inputs = torch.randn(samples, positions, 3, dtype=DTYPE)
    targets = torch.randint(0, 2, (samples,))
    precond = KFAC(
        model, layers=[model.token], factor_decay=0.0, inv_update_interval=1, damping=damping
    )
    backward(model, inputs, targets)
    gradient = torch.cat([model.token.weight.grad, model.token.bias.grad[:, None]], 1)
    precond.step()

    features = torch.cat([inputs, torch.ones(samples, positions, 1, dtype=DTYPE)], -1)
    features = features.reshape(-1, 4)
    outputs = model.token(inputs).detach().requires_grad_()
    logits = model.head(torch.tanh(outputs).mean(1))
    (grads,) = torch.autograd.grad(
        nn.functional.cross_entropy(logits, targets, reduction="sum"), outputs
    )
    grads = grads.reshape(-1, 4)
    input_factor = features.T @ features / (samples * positions)
    output_factor = grads.T @ grads / samples
    state = precond.layers[0]
    torch.testing.assert_close(state.input_factor, input_factor)
    torch.testing.assert_close(state.output_factor, output_factor)
    block = torch.kron(output_factor, input_factor) + damping * torch.eye(16, dtype=DTYPE)
    expected = torch.linalg.solve(block, gradient.reshape(-1)).reshape(4, 4)
    torch.testing.assert_close(model.token.weight.grad, expected[:, :3])
    torch.testing.assert_close(model.token.bias.grad, expected[:, 3])


@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
def test_linear_layer_over_sequences_with_reduce_pools_each_sequence(fisher_type: str) -> None:
    """K-FAC-reduce: ``A`` is the mean over sequences of ``ā āᵀ`` (``ā`` the input averaged
    over positions), ``G`` the mean of ``ĝ ĝᵀ`` (``ĝ`` the output gradients summed over
    positions); against brute-force output gradients of the NLL at the same targets (for
    ``"mc"``: drawn by a generator with the preconditioner's seed)."""
    torch.manual_seed(0)
    model = _SequenceClassifier()
    samples, positions = 5, 6
    inputs = torch.randn(samples, positions, 3, dtype=DTYPE)
    targets = torch.randint(0, 2, (samples,))
    precond = KFAC(
        model,
        layers=[model.token],
        factor_decay=0.0,
        inv_update_interval=1,
        kfac_approx="reduce",
        **fisher_options(fisher_type, seed=4),
    )
    model.zero_grad()
    logits = model(inputs)
    if fisher_type == "mc":
        precond.sample_backward(logits)
        targets = get_likelihood("categorical").sample(
            logits.detach(), torch.Generator().manual_seed(4)
        )
    nn.functional.cross_entropy(logits, targets).backward()
    precond.step()

    means = torch.cat([inputs.mean(1), torch.ones(samples, 1, dtype=DTYPE)], -1)
    outputs = model.token(inputs).detach().requires_grad_()
    pooled = model.head(torch.tanh(outputs).mean(1))
    (grads,) = torch.autograd.grad(
        nn.functional.cross_entropy(pooled, targets, reduction="sum"), outputs
    )
    sums = grads.sum(1)
    state = precond.layers[0]
    torch.testing.assert_close(state.input_factor, means.T @ means / samples)
    torch.testing.assert_close(state.output_factor, sums.T @ sums / samples)


def test_mc_fisher_of_a_sequence_model_from_flattened_outputs() -> None:
    """Per-token outputs ``(N, T, C)`` go to ``sample_backward`` flattened to ``(N·T, C)``:
    ``G`` sums the sampled tokens' ``g gᵀ`` over positions and averages over the N sequences,
    the scale of the empirical Fisher of ``sum-over-tokens loss / N``."""
    torch.manual_seed(0)
    samples, positions, classes = 4, 5, 3
    model = nn.Sequential(nn.Embedding(7, 6), nn.Tanh(), nn.Linear(6, classes)).to(DTYPE)
    tokens = torch.randint(0, 7, (samples, positions))
    precond = mc_kfac(model, seed=5, factor_decay=0.0, inv_update_interval=1)
    logits = model(tokens).reshape(-1, classes)
    precond.sample_backward(logits)
    labels = torch.randint(0, classes, (samples * positions,))
    (nn.functional.cross_entropy(logits, labels, reduction="sum") / samples).backward()
    precond.step()

    hidden = model[1](model[0](tokens)).detach()
    outputs = model[2](hidden).detach().requires_grad_()
    flat = outputs.reshape(-1, classes)
    sampled = get_likelihood("categorical").sample(flat.detach(), torch.Generator().manual_seed(5))
    nll = nn.functional.cross_entropy(flat, sampled, reduction="sum")
    (grads,) = torch.autograd.grad(nll, outputs)
    grads = grads.reshape(-1, classes)
    ones = torch.ones(samples * positions, 1, dtype=DTYPE)
    features = torch.cat([hidden.reshape(-1, 6), ones], 1)
    state = precond.layers[1]
    torch.testing.assert_close(state.output_factor, grads.T @ grads / samples)
    torch.testing.assert_close(state.input_factor, features.T @ features / (samples * positions))


def test_mc_fisher_leaves_out_the_positions_indexed_out_of_the_outputs() -> None:
    """Padding positions are left out of ``G`` by passing ``outputs[mask]``: only the kept
    positions draw targets; ``A`` still holds every position's inputs."""
    torch.manual_seed(0)
    samples, positions, classes = 4, 5, 3
    model = nn.Sequential(nn.Embedding(7, 6), nn.Linear(6, classes)).to(DTYPE)
    tokens = torch.randint(0, 7, (samples, positions))
    mask = tokens != 0
    precond = mc_kfac(model, seed=5, factor_decay=0.0, inv_update_interval=1)
    logits = model(tokens)
    precond.sample_backward(logits[mask])
    model.zero_grad()
    nn.functional.cross_entropy(logits[mask], tokens[mask] % classes).backward()
    precond.step()

    hidden = model[0](tokens).detach()
    kept = model[1](hidden[mask]).detach().requires_grad_()
    sampled = get_likelihood("categorical").sample(kept.detach(), torch.Generator().manual_seed(5))
    (grads,) = torch.autograd.grad(
        nn.functional.cross_entropy(kept, sampled, reduction="sum"), kept
    )
    ones = torch.ones(samples * positions, 1, dtype=DTYPE)
    features = torch.cat([hidden.reshape(-1, 6), ones], 1)
    state = precond.layers[1]
    assert 0 < int(mask.sum()) < samples * positions
    torch.testing.assert_close(state.output_factor, grads.T @ grads / samples)
    torch.testing.assert_close(state.input_factor, features.T @ features / (samples * positions))


def test_mc_sampling_refuses_unflattened_outputs_per_position() -> None:
    """The likelihoods take ``(N, C)`` outputs; ``(N, T, C)`` ones get told to flatten."""
    model = nn.Sequential(nn.Embedding(7, 6), nn.Linear(6, 3))
    precond = mc_kfac(model, seed=0)
    with pytest.raises(ValueError, match=r"got \(4, 5, 3\).*outputs.flatten\(0, -2\)"):
        precond.sample_backward(model(torch.randint(0, 7, (4, 5))))


@pytest.mark.parametrize("make_model", [mlp, convnet, grouped_convnet])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_gradient_accumulation_equals_one_large_batch(make_model, kfac_approx: str) -> None:
    torch.manual_seed(7)
    reference = make_model()
    model = copy.deepcopy(reference)
    shape = INPUT_SHAPES[make_model]
    inputs, targets = torch.randn(8, *shape, dtype=DTYPE), torch.randint(0, 3, (8,))
    options = {"inv_update_interval": 1, "damping": 0.1, "kfac_approx": kfac_approx}
    precond = KFAC(reference, **options)
    backward(reference, inputs, targets)
    precond.step()

    accumulating = KFAC(model, **options, accumulation_steps=2)
    model.zero_grad()
    for half in (slice(0, 4), slice(4, 8)):
        (nn.functional.cross_entropy(model(inputs[half]), targets[half]) / 2).backward()
    accumulating.step()
    torch.testing.assert_close(flat_grads(model), flat_grads(reference))


@pytest.mark.parametrize(
    ("conv", "kfac_approx"),
    [(None, "expand"), (1, "expand"), (1, "reduce"), (2, "expand"), (2, "reduce")],
)
def test_autocast_keeps_float32_factors(conv: int | None, kfac_approx: str) -> None:
    """``conv``: the groups of a convolution (2: grouped), ``None`` for an MLP."""
    torch.manual_seed(8)
    if conv:
        model = nn.Sequential(
            nn.Conv2d(2, 4, 2, padding=1, groups=conv),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(4 * 16, 3),
        )
        inputs = torch.randn(16, 2, 3, 3)
    else:
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
        inputs = torch.randn(16, 3)
    reference = copy.deepcopy(model)
    targets = torch.randint(0, 3, (16,))
    precond = KFAC(model, inv_update_interval=1, damping=0.1, kfac_approx=kfac_approx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(inputs), targets)
    loss.backward()
    precond.step()
    reference_precond = KFAC(reference, inv_update_interval=1, damping=0.1, kfac_approx=kfac_approx)
    backward(reference, inputs, targets)
    reference_precond.step()
    for state, expected in zip(precond.layers, reference_precond.layers, strict=True):
        assert state.input_factor.dtype == torch.float32
        assert state.output_factor.dtype == torch.float32
        torch.testing.assert_close(state.input_factor, expected.input_factor, rtol=0.05, atol=0.02)
    for param, expected in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.isfinite(param.grad).all()
        torch.testing.assert_close(param.grad, expected.grad, rtol=0.1, atol=0.05)


def test_kl_clip_scales_to_the_trust_region() -> None:
    torch.manual_seed(9)
    model = mlp()
    inputs, targets = torch.randn(8, 3, dtype=DTYPE), torch.randint(0, 3, (8,))
    unclipped_model = copy.deepcopy(model)
    unclipped = KFAC(unclipped_model, inv_update_interval=1, damping=0.01)
    backward(unclipped_model, inputs, targets)
    gradient = flat_grads(unclipped_model)
    unclipped.step()
    direction = flat_grads(unclipped_model)
    lr, kl_clip = 0.5, 1e-6
    clipped = KFAC(model, inv_update_interval=1, damping=0.01, kl_clip=kl_clip, lr=lambda step: lr)
    backward(model, inputs, targets)
    clipped.step()
    nu = math.sqrt(kl_clip / (lr**2 * float(direction @ gradient)))
    assert nu < 1
    torch.testing.assert_close(flat_grads(model), nu * direction)
    assert unclipped.last_kl_scale is None
    assert clipped.last_kl_scale == pytest.approx(nu, rel=1e-12)


def test_last_kl_scale_is_one_where_the_clip_does_not_bind() -> None:
    torch.manual_seed(9)
    model = mlp()
    precond = KFAC(model, inv_update_interval=1, damping=0.01, kl_clip=1e6, lr=0.5)
    assert precond.last_kl_scale is None
    backward(model, torch.randn(8, 3, dtype=DTYPE), torch.randint(0, 3, (8,)))
    precond.step()
    assert precond.last_kl_scale == 1.0


def test_kl_clip_reads_the_learning_rate_from_the_optimizer_under_a_scheduler() -> None:
    """``lr=optimizer`` gives, step by step, the clipping of the equivalent ``lr`` schedule."""
    torch.manual_seed(9)
    inputs, targets = torch.randn(8, 3, dtype=DTYPE), torch.randint(0, 3, (8,))
    models = [mlp(), None]
    models[1] = copy.deepcopy(models[0])
    unclipped_model = copy.deepcopy(models[0])  # before any hooks are attached
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.5) for model in models]
    scheduler = torch.optim.lr_scheduler.StepLR(optimizers[0], step_size=1, gamma=0.1)
    options = {"inv_update_interval": 1, "damping": 0.01, "kl_clip": 1e-6}
    following = KFAC(models[0], lr=optimizers[0], **options)
    scheduled = KFAC(models[1], lr=lambda step: 0.5 * 0.1**step, **options)
    unclipped = KFAC(unclipped_model, inv_update_interval=1, damping=0.01)
    for step in range(3):
        for model, precond in zip(models, (following, scheduled), strict=True):
            backward(model, inputs, targets)
            precond.step()
        torch.testing.assert_close(flat_grads(models[0]), flat_grads(models[1]), rtol=0, atol=0)
        unclipped_model.load_state_dict(models[0].state_dict())
        backward(unclipped_model, inputs, targets)
        gradient = flat_grads(unclipped_model)
        unclipped.step()
        direction = flat_grads(unclipped_model)
        lr = 0.5 * 0.1**step
        nu = min(1.0, math.sqrt(1e-6 / (lr**2 * float(direction @ gradient))))
        assert nu < 1
        torch.testing.assert_close(flat_grads(models[0]), nu * direction)
        for optimizer in optimizers:
            optimizer.step()
        scheduler.step()
        optimizers[1].param_groups[0]["lr"] = optimizers[0].param_groups[0]["lr"]


def test_kl_clip_weighs_each_layer_by_the_learning_rate_of_its_param_group() -> None:
    """``ν = sqrt(kl_clip / Σ_l lr_l² d_l · g_l)`` with each layer's rate from its group (a
    frozen bias, in no group, is not asked for one)."""
    torch.manual_seed(9)
    model = mlp()
    model[0].bias.requires_grad_(False)
    inputs, targets = torch.randn(8, 3, dtype=DTYPE), torch.randint(0, 3, (8,))
    unclipped_model = copy.deepcopy(model)
    unclipped = KFAC(unclipped_model, inv_update_interval=1, damping=0.01)
    backward(unclipped_model, inputs, targets)
    gradients = [unclipped_model[index].weight.grad.flatten().clone() for index in (0, 2)]
    unclipped.step()
    directions = [unclipped_model[index].weight.grad.flatten() for index in (0, 2)]
    rates, kl_clip = (0.1, 0.5), 1e-6
    optimizer = torch.optim.SGD(
        [{"params": [model[0].weight], "lr": rates[0]}, {"params": [model[2].weight]}],
        lr=rates[1],
    )
    clipped = KFAC(model, inv_update_interval=1, damping=0.01, kl_clip=kl_clip, lr=optimizer)
    backward(model, inputs, targets)
    clipped.step()
    quadratic = sum(
        rate**2 * float(direction @ gradient)
        for rate, direction, gradient in zip(rates, directions, gradients, strict=True)
    )
    nu = math.sqrt(kl_clip / quadratic)
    assert nu < 1
    for index, direction in zip((0, 2), directions, strict=True):
        torch.testing.assert_close(model[index].weight.grad.flatten(), nu * direction)


def test_kl_clip_refuses_a_layer_split_across_learning_rates() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(
        [{"params": [model[0].weight, model[2].weight], "lr": 0.1}, {"params": [model[0].bias]}],
        lr=0.2,
    )
    precond = KFAC(model, kl_clip=1e-3, lr=optimizer)
    backward(model, torch.randn(4, 3, dtype=DTYPE), torch.randint(0, 3, (4,)))
    with pytest.raises(ValueError, match=r"layer '0'.*\[0\.1, 0\.2\]"):
        precond.step()


def test_damping_schedule_and_untouched_parameters() -> None:
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 3)).to(DTYPE)
    inputs, targets = torch.randn(8, 3, dtype=DTYPE), torch.randint(0, 3, (8,))
    seen = []

    def schedule(step: int) -> float:
        seen.append(step)
        return 0.1 / (step + 1)

    precond = KFAC(model, layers=[model[2]], damping=schedule, inv_update_interval=1)
    assert [state.name for state in precond.layers] == ["2"]
    backward(model, inputs, targets)
    before = {name: p.grad.clone() for name, p in model.named_parameters()}
    precond.step()
    assert seen == [0]
    for name, param in model.named_parameters():
        changed = not torch.equal(param.grad, before[name])
        assert changed == name.startswith("2.")


def test_a_deep_copy_of_the_model_does_not_record_into_the_preconditioner() -> None:
    """``copy.deepcopy`` copies the forward hooks too (e.g. for an EMA model or a twin run):
    training the copy must leave the original's statistics and steps as they are."""
    torch.manual_seed(3)
    model = mlp()
    inputs, targets = torch.randn(8, 3, dtype=DTYPE), torch.randint(0, 3, (8,))
    reference = copy.deepcopy(model)
    precond = KFAC(model, inv_update_interval=1, damping=0.1)
    reference_precond = KFAC(reference, inv_update_interval=1, damping=0.1)
    copied = copy.deepcopy(model)
    for _ in range(2):
        backward(copied, torch.randn(5, 3, dtype=DTYPE), torch.randint(0, 3, (5,)))
        for net, preconditioner in ((model, precond), (reference, reference_precond)):
            backward(net, inputs, targets)
            preconditioner.step()
        torch.testing.assert_close(flat_grads(model), flat_grads(reference), rtol=0, atol=0)


@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
def test_a_model_with_a_preconditioner_saves_whole_without_it(fisher_type: str) -> None:
    """``torch.save(model)`` pickles the layers' forward hooks: they were closures, which
    pickle refuses. They pickle to inert hooks: the loaded model trains without recording."""
    torch.manual_seed(3)
    model = mlp()
    precond = KFAC(model, fisher_type=fisher_type, likelihood="categorical", damping=0.1)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    backward(loaded, torch.randn(5, 3, dtype=DTYPE), torch.randint(0, 3, (5,)))
    assert all(state.input_count == state.output_count == 0 for state in precond.layers)
    for param, saved in zip(model.parameters(), loaded.parameters(), strict=True):
        torch.testing.assert_close(saved, param, rtol=0, atol=0)


def test_invalid_options_raise() -> None:
    model = mlp()
    with pytest.raises(ValueError, match="fisher_type"):
        KFAC(model, fisher_type="exact")
    with pytest.raises(ValueError, match="likelihood"):
        KFAC(model, fisher_type="mc")
    with pytest.raises(ValueError, match="lr"):
        KFAC(model, kl_clip=0.01)
    with pytest.raises(ValueError, match=r"lr.*-0\.1"):
        KFAC(model, kl_clip=0.01, lr=-0.1)
    with pytest.raises(TypeError, match="lr"):
        KFAC(model, kl_clip=0.01, lr="0.1")
    with pytest.raises(ValueError, match="factor_decay"):
        KFAC(model, factor_decay=1.0)
    with pytest.raises(ValueError, match="inv_update_interval"):
        KFAC(model, inv_update_interval=0)
    with pytest.raises(ValueError, match=r"kfac_approx must be one of .*, got 'mean'"):
        KFAC(model, kfac_approx="mean")
    with pytest.raises(ValueError, match="cannot be preconditioned"):
        KFAC(model, layers=[model[1]])
    with pytest.raises(ValueError, match="only damping_mode='eigen'"):
        EKFAC(model, damping_mode="factored")
    with pytest.raises(ValueError, match="sample_backward"):
        KFAC(model).sample_backward(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="layers"):
        KFAC(mlp()).load_state_dict(KFAC(convnet()).state_dict())
    precond = KFAC(model, damping=lambda step: -1.0, inv_update_interval=1)
    backward(model, torch.randn(2, 3, dtype=DTYPE), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="damping"):
        precond.step()
    assert get_likelihood("categorical").name == "categorical"


def test_layer_types_select_layers_grouped_convolutions_included() -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 2, 1, groups=2), nn.Conv2d(2, 2, 1), nn.Flatten(), nn.Linear(2, 3)
    ).to(DTYPE)
    assert [state.name for state in KFAC(model).layers] == ["0", "1", "3"]
    assert [state.name for state in KFAC(model, layers=[nn.Conv2d]).layers] == ["0", "1"]
    assert [state.name for state in KFAC(model, layers=[model[0]]).layers] == ["0"]
    sequence = nn.Sequential(nn.Conv1d(2, 2, 1, groups=2), nn.Conv1d(2, 2, 1), nn.Flatten())
    assert [state.name for state in KFAC(sequence).layers] == ["0", "1"]
    with pytest.raises(ValueError, match="unsupported layer types"):
        KFAC(model, layers=[nn.LayerNorm])
    with pytest.raises(ValueError, match="model has no Embedding layer"):
        KFAC(model, layers=[nn.Embedding])
    with pytest.raises(TypeError, match="not a mix"):
        KFAC(model, layers=[nn.Conv2d, model[3]])
    with pytest.raises(TypeError, match=r"got \['3'\] \(for a layer's name"):
        KFAC(model, layers=["3"])
    with pytest.raises(TypeError, match="a sequence of modules or module types"):
        KFAC(model, layers=model[3])
    norm = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    with pytest.raises(ValueError, match="cannot be preconditioned"):
        KFAC(norm, layers=[norm[1]])


def unit_residual_regression(seed: int, bias: bool):
    """``nn.Linear(3, 1)`` on one sample whose residual is 1, loss ``½ (f − y)²``: the empirical
    Fisher ``r² [x, 1][x, 1]ᵀ`` equals the Hessian, so K-FAC's quadratic model is exact."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Linear(3, 1, bias=bias).to(DTYPE)
    inputs = torch.randn(1, 3, generator=generator, dtype=DTYPE)
    with torch.no_grad():
        targets = model(inputs) - 1.0

    def loss_at(params: dict[str, torch.Tensor]) -> torch.Tensor:
        outputs = functional_call(model, params, (inputs,))
        return 0.5 * (outputs - targets).pow(2).sum() / len(inputs)

    return model, loss_at


def adaptive_step(lr: float, damping: float = 1e-3, bias: bool = True, cls: type = KFAC):
    """One adaptive K-FAC step; returns the preconditioner and the dense oracle's prediction."""
    model, loss_at = unit_residual_regression(0, bias)
    precond = cls(
        model,
        factor_decay=0.0,
        inv_update_interval=1,
        damping=damping,
        adaptive_damping=True,
        damping_adaptation_interval=1,
    )
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss = loss_at(dict(model.named_parameters()))
    loss.backward()
    gradient = flat_grads(model)
    precond.step()
    assert precond.damping_update_due
    torch.optim.SGD(model.parameters(), lr=lr).step()
    after = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        loss_after = loss_at(after)
    precond.update_damping(loss, loss_after)
    assert not precond.damping_update_due
    precond.remove()
    delta = torch.cat([(after[name] - before[name]).reshape(-1) for name in before])
    hessian = torch.func.hessian(lambda flat: loss_at(unflatten(flat, before)))(
        torch.cat([value.reshape(-1) for value in before.values()])
    )
    predicted = gradient @ delta + 0.5 * delta @ (hessian + damping * torch.eye(len(delta))) @ delta
    return precond, float(predicted), float(loss_after - loss.detach())


def unflatten(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, value in like.items():
        out[name] = flat[offset : offset + value.numel()].reshape(value.shape)
        offset += value.numel()
    return out


@pytest.mark.parametrize(("bias", "cls"), [(True, KFAC), (False, KFAC), (True, EKFAC)])
def test_adaptive_damping_decreases_when_the_quadratic_model_is_exact(bias: bool, cls) -> None:
    """On one sample EKFAC's re-estimated eigenvalues equal K-FAC's, so both models are exact."""
    damping = 1e-3
    precond, predicted, actual = adaptive_step(lr=0.5, damping=damping, bias=bias, cls=cls)
    update = precond.last_damping_update
    torch.testing.assert_close(update["predicted"], predicted, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(update["actual"], actual, rtol=1e-10, atol=1e-12)
    assert update["ratio"] == pytest.approx(1.0, abs=1e-2)
    assert precond.current_damping() == pytest.approx(damping * 19 / 20, rel=1e-12)


def test_adaptive_damping_increases_when_the_step_overshoots() -> None:
    damping = 1e-3
    precond, predicted, actual = adaptive_step(lr=3.0, damping=damping)
    update = precond.last_damping_update
    assert actual > 0 and predicted > 0  # lr = 3 > 2 overshoots the model's own minimum
    torch.testing.assert_close(update["predicted"], predicted, rtol=1e-10, atol=1e-12)
    assert update["ratio"] == -math.inf
    assert precond.current_damping() == pytest.approx(damping * 20 / 19, rel=1e-12)


def test_adaptive_damping_every_interval_and_state_round_trip() -> None:
    torch.manual_seed(11)
    model = mlp()
    options = {"damping": 0.1, "adaptive_damping": True, "damping_adaptation_interval": 3}
    options |= {"damping_decay": 0.5, "inv_update_interval": 1}
    precond = KFAC(model, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    due = []
    for inputs, targets in batches(7, seed=2):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        precond.step()
        optimizer.step()
        due.append(precond.damping_update_due)
        if precond.damping_update_due:
            with torch.no_grad():
                loss_after = nn.functional.cross_entropy(model(inputs), targets)
            previous = precond.current_damping()
            new = precond.update_damping(loss, loss_after)
            assert new / previous in (pytest.approx(0.5), 1.0, pytest.approx(2.0))
    assert due == [True, False, False, True, False, False, True]
    assert precond.last_damping_update is not None
    resumed = KFAC(mlp(), **options)
    resumed.load_state_dict(copy.deepcopy(precond.state_dict()))
    assert resumed.current_damping() == precond.current_damping()
    assert resumed.current_damping() != 0.1 or precond.last_damping_update["ratio"] >= 0.25


def test_adaptive_damping_bad_input_raises() -> None:
    model = mlp()
    with pytest.raises(ValueError, match="positive float initial damping"):
        KFAC(model, adaptive_damping=True, damping=lambda step: 0.1)
    with pytest.raises(ValueError, match="positive float initial damping"):
        KFAC(model, adaptive_damping=True, damping=0.0)
    with pytest.raises(ValueError, match="damping_decay"):
        KFAC(model, adaptive_damping=True, damping_decay=1.5)
    with pytest.raises(ValueError, match="damping_bounds"):
        KFAC(model, adaptive_damping=True, damping=1.0, damping_bounds=(2.0, 3.0))
    with pytest.raises(ValueError, match=r"damping_bounds \(1.0, 0.1\) must satisfy"):
        KFAC(model, damping_bounds=(1.0, 0.1))
    for damping in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="damping must be a non-negative finite number"):
            KFAC(model, damping=damping)
    precond = KFAC(model, inv_update_interval=1)
    backward(model, torch.randn(2, 3, dtype=DTYPE), torch.tensor([0, 1]))
    precond.step()
    with pytest.raises(ValueError, match="damping_update_due"):
        precond.update_damping(1.0, 0.5)
    adaptive_model = mlp()
    adaptive = KFAC(adaptive_model, adaptive_damping=True, inv_update_interval=1)
    backward(adaptive_model, torch.randn(2, 3, dtype=DTYPE), torch.tensor([0, 1]))
    adaptive.step()
    with pytest.raises(ValueError, match="loss_before"):
        adaptive.update_damping(math.nan, 0.5)


@pytest.mark.parametrize("damping_mode", ["eigen", "factored"])
def test_cached_inverse_follows_a_damping_schedule_between_eigen_refreshes(damping_mode) -> None:
    """Eigenbases from step 0 are kept (no refresh); the damping changes every step."""
    torch.manual_seed(12)
    model = mlp()
    (inputs0, targets0), (inputs1, targets1), (inputs2, targets2) = batches(3, seed=3)
    operator = build_kfac(
        model, inputs0, likelihood="categorical", kind="empirical", targets=targets0
    )
    precond = KFAC(
        model,
        factor_decay=0.0,
        inv_update_interval=100,
        damping=lambda step: 0.05 * (step + 1),
        damping_mode=damping_mode,
    )
    solve = operator.solve if damping_mode == "eigen" else operator.solve_factored
    for step, (inputs, targets) in enumerate(
        [(inputs0, targets0), (inputs1, targets1), (inputs2, targets2)]
    ):
        backward(model, inputs, targets)
        gradient = flat_grads(model)
        precond.step()
        torch.testing.assert_close(flat_grads(model), solve(gradient, 0.05 * (step + 1)))


def test_recording_paused_skips_the_statistics_of_the_passes_inside() -> None:
    data = batches(3)
    model = mlp()
    twin = copy.deepcopy(model)
    precond, twin_precond = KFAC(model, damping=0.1), KFAC(twin, damping=0.1)
    for inputs, targets in data[:2]:
        with precond.recording_paused():
            with precond.recording_paused():
                backward(model, *data[2])
            backward(model, *data[2])  # still paused: the outer block restores it
        backward(model, inputs, targets)
        precond.step()
        backward(twin, inputs, targets)
        twin_precond.step()
        torch.testing.assert_close(flat_grads(model), flat_grads(twin), rtol=0, atol=0)
    for ours, theirs in zip(precond.layers, twin_precond.layers, strict=True):
        torch.testing.assert_close(ours.input_factor, theirs.input_factor, rtol=0, atol=0)
        torch.testing.assert_close(ours.output_factor, theirs.output_factor, rtol=0, atol=0)


def test_non_finite_statistics_are_skipped_with_a_warning() -> None:
    (inputs, targets), (bad_inputs, _) = batches(2)
    model = mlp()
    precond = KFAC(model, damping=0.1, factor_decay=0.5)
    backward(model, inputs, targets)
    precond.step()
    factors = [(s.input_factor.clone(), s.output_factor.clone()) for s in precond.layers]
    bad_inputs[0, 0] = float("inf")
    backward(model, bad_inputs, targets)
    with pytest.warns(RuntimeWarning, match="skipped a factor update"):
        precond.step()
    for state, (input_factor, output_factor) in zip(precond.layers, factors, strict=True):
        torch.testing.assert_close(state.input_factor, input_factor, rtol=0, atol=0)
        torch.testing.assert_close(state.output_factor, output_factor, rtol=0, atol=0)
    backward(model, inputs, targets)
    precond.step()  # the next finite batch is folded in as usual
    expected = 0.5 * factors[0][0] + 0.5 * factors[0][0]
    torch.testing.assert_close(precond.layers[0].input_factor, expected)
