"""The curvature builders reject bad arguments with clear errors."""

import pytest
import torch
from brute_force import tiny_data, tiny_mlp
from torch import nn

from natgrad.curvature import fisher, ggn, hessian


@pytest.fixture
def problem():
    model = tiny_mlp()
    inputs, targets = tiny_data("categorical")
    return model, inputs, targets


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"kind": "fast"}, ValueError, r"unknown kind 'fast'.*'exact', 'mc', 'empirical'"),
        ({"structure": "full"}, ValueError, r"unknown structure 'full'.*'kfac'"),
        ({"likelihood": "laplace"}, ValueError, r"unknown likelihood 'laplace'.*'poisson'"),
        ({"kind": "empirical"}, ValueError, "targets"),
        ({"kind": "mc", "mc_samples": 0}, ValueError, "mc_samples must be at least 1"),
        ({"kind": "mc", "mc_samples": 2.0}, TypeError, "mc_samples must be an int"),
        ({"targets": torch.zeros(4, dtype=torch.long)}, ValueError, "5 entries"),
        ({"kfac_approx": "mean"}, ValueError, r"unknown kfac_approx 'mean'.*'reduce'"),
        (
            {"kfac_approx": "reduce"},
            ValueError,
            r"kfac_approx='reduce' applies to structure='kfac' or 'ekfac', got structure='dense'",
        ),
    ],
)
def test_fisher_rejects_bad_arguments(problem, arguments, error, message) -> None:
    model, inputs, _ = problem
    with pytest.raises(error, match=message):
        fisher(model, inputs, **arguments)


def test_fisher_rejects_non_finite_inputs_and_targets(problem) -> None:
    model, inputs, _ = problem
    broken = inputs.clone()
    broken[0, 0] = float("nan")
    with pytest.raises(ValueError, match="inputs must not contain infs or NaNs"):
        fisher(model, broken)
    targets = torch.full((5, 3), float("inf"), dtype=inputs.dtype)
    with pytest.raises(ValueError, match="targets must not contain"):
        fisher(model, inputs, likelihood="gaussian", kind="empirical", targets=targets)
    with pytest.raises(TypeError, match=r"inputs must be a torch\.Tensor"):
        fisher(model, inputs.tolist())


def test_models_without_trainable_parameters_are_rejected(problem) -> None:
    model, inputs, targets = problem
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fisher(model, inputs)
    with pytest.raises(ValueError, match="no trainable parameters"):
        ggn(model, inputs, nn.CrossEntropyLoss(), targets)
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        fisher(lambda x: x, inputs)


@pytest.mark.parametrize("build", [ggn, hessian])
def test_loss_builders_reject_bad_arguments(problem, build) -> None:
    model, inputs, targets = problem
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match=r"unknown structure 'trace'.*'implicit'"):
        build(model, inputs, loss_fn, targets, structure="trace")
    with pytest.raises(ValueError, match="5 entries"):
        build(model, inputs, loss_fn, targets[:3])
    with pytest.raises(ValueError, match="scalar"):
        build(model, inputs, nn.CrossEntropyLoss(reduction="none"), targets)
    with pytest.raises(TypeError, match="callable"):
        build(model, inputs, "cross_entropy", targets)
    broken = inputs.clone()
    broken[1, 2] = float("inf")
    with pytest.raises(ValueError, match="inputs must not contain"):
        build(model, broken, loss_fn, targets)


def test_loss_builders_reject_a_non_finite_loss(problem) -> None:
    model, inputs, targets = problem
    with pytest.raises(ValueError, match="not finite"):
        ggn(model, inputs, lambda f, y: f.sum() / 0.0, targets)


STRUCTURES = ["dense", "diag", "block", "kfac", "ekfac", "implicit"]


def builders(structure: str) -> list:
    """``fisher``, ``ggn`` and (where it has ``structure``) ``hessian`` of a classifier."""
    made = [
        lambda model, inputs, targets: fisher(model, inputs, structure=structure),
        lambda model, inputs, targets: ggn(
            model,
            inputs,
            nn.functional.cross_entropy,
            targets,
            structure=structure,
            separable="mean",
        ),
    ]
    if structure not in ("kfac", "ekfac"):
        made.append(
            lambda model, inputs, targets: hessian(
                model, inputs, nn.functional.cross_entropy, targets, structure=structure
            )
        )
    return made


def middle_layer_model(middle: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), middle, nn.Linear(4, 3)).double()


@pytest.mark.parametrize("structure", STRUCTURES)
def test_batch_norm_in_training_mode_is_rejected(problem, structure) -> None:
    """Also without affine parameters, where the model is otherwise one K-FAC and the
    per-layer diagonal cover (they accepted it before)."""
    _, inputs, targets = problem
    for build in builders(structure):
        model = middle_layer_model(nn.BatchNorm1d(4, affine=False))
        with pytest.raises(ValueError, match="BatchNorm layer in training mode"):
            build(model, inputs, targets)
        model.eval()
        assert build(model, inputs, targets).shape == (31, 31)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_dropout_in_training_mode_is_rejected(problem, structure) -> None:
    """Dropout draws its masks from the global random state: the dense builders failed inside
    ``vmap``, K-FAC and the per-layer diagonal returned one random sub-network's curvature.
    In eval mode the curvature is the model's without the dropout layer."""
    _, inputs, targets = problem
    for build in builders(structure):
        model = middle_layer_model(nn.Dropout(0.5))
        with pytest.raises(ValueError, match=r"modules \['1'\] are dropout layers in training"):
            build(model, inputs, targets)
        model.eval()
        torch.testing.assert_close(
            build(model, inputs, targets).to_dense(),
            build(middle_layer_model(nn.Identity()), inputs, targets).to_dense(),
        )


def token_model(scale_grad_by_freq: bool) -> nn.Module:
    torch.manual_seed(0)
    embedding = nn.Embedding(6, 3, scale_grad_by_freq=scale_grad_by_freq)
    return nn.Sequential(embedding, nn.Flatten(), nn.Linear(12, 4)).double()


TOKENS = torch.tensor([[1, 1, 2, 3], [0, 4, 4, 4], [5, 1, 1, 2]])
TOKEN_TARGETS = torch.tensor([0, 1, 3])


@pytest.mark.parametrize(
    "build",
    [
        lambda model, structure: fisher(model, TOKENS, structure=structure),
        lambda model, structure: ggn(
            model, TOKENS, nn.functional.cross_entropy, TOKEN_TARGETS, structure=structure
        ),
        lambda model, structure: hessian(
            model, TOKENS, nn.functional.cross_entropy, TOKEN_TARGETS, structure=structure
        ),
    ],
    ids=["fisher", "ggn", "hessian"],
)
@pytest.mark.parametrize("structure", ["dense", "diag", "block", "implicit"])
def test_frequency_scaled_embeddings_are_rejected(build, structure) -> None:
    """Autograd divides the gradient of a ``scale_grad_by_freq`` embedding by the tokens'
    counts, so its backward pass is not the model's derivative: the builders' per-sample
    Jacobians (counts of one sample) and Hessians would differ from those of the same function
    with the flag off (by up to 0.1 here) without notice. Frozen, the embedding is no
    parameter, and the curvature equals the unscaled model's."""
    with pytest.raises(ValueError, match=r"embeddings \['0'\] have scale_grad_by_freq=True"):
        build(token_model(True), structure)
    frozen, reference = token_model(True), token_model(False)
    for model in (frozen, reference):
        model[0].weight.requires_grad_(False)
    torch.testing.assert_close(
        build(frozen, structure).to_dense(), build(reference, structure).to_dense()
    )


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("structure", ["dense", "diag", "block", "implicit"])
def test_embeddings_with_a_max_norm_are_rejected_before_the_model_runs(structure, frozen) -> None:
    """The forward pass of an embedding with ``max_norm`` renormalises its weight in place,
    which failed inside ``vmap`` (frozen or not) after changing the weight."""
    model = token_model(False)
    model[0].max_norm = 0.5
    model[0].weight.requires_grad_(not frozen)
    weight = model[0].weight.detach().clone()
    for build in (
        lambda: fisher(model, TOKENS, structure=structure),
        lambda: ggn(model, TOKENS, nn.functional.cross_entropy, TOKEN_TARGETS, structure=structure),
        lambda: hessian(
            model, TOKENS, nn.functional.cross_entropy, TOKEN_TARGETS, structure=structure
        ),
    ):
        with pytest.raises(ValueError, match=r"embeddings \['0'\] have a max_norm"):
            build()
    assert torch.equal(model[0].weight, weight)
    model[0].max_norm = None
    parameters = 12 * 4 + 4 + (0 if frozen else 6 * 3)
    assert fisher(model, TOKENS, structure=structure).shape == (parameters, parameters)


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 3)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer(inputs), inputs


@pytest.mark.parametrize("structure", STRUCTURES)
def test_a_model_returning_several_tensors_is_rejected(problem, structure) -> None:
    _, inputs, _ = problem
    with pytest.raises(TypeError, match=r"must return one tensor of outputs, .*got tuple"):
        fisher(TwoOutputs().double(), inputs, structure=structure)


OUT_OF_SUPPORT = [
    ("categorical", torch.tensor([0, 1, 2, 3, 1]), r"class indices in \[0, 3\), got values 0 to 3"),
    (
        "categorical",
        torch.tensor([0, -1, 2, 0, 1]),
        r"class indices in \[0, 3\), got values -1 to 2",
    ),
    (
        "categorical",
        torch.tensor([0.0, 1.5, 2.0, 0.0, 1.0]),
        "class indices, got values such as 1.5",
    ),
    ("bernoulli", torch.full((5, 3), 2.0), r"lie in \[0, 1\], got values 2 to 2"),
    ("poisson", -torch.ones(5, 3), "non-negative counts, got a minimum of -1"),
]


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize(("likelihood", "targets", "message"), OUT_OF_SUPPORT)
def test_observed_targets_outside_the_support_are_rejected(
    problem, structure, likelihood, targets, message
) -> None:
    """The empirical Fisher's gradients at impossible targets (a class the model does not
    have, a negative count) were computed, or failed inside an indexing kernel."""
    model, inputs, _ = problem
    with pytest.raises(ValueError, match=f"{likelihood} likelihood: targets must .*{message}"):
        fisher(
            model,
            inputs,
            likelihood=likelihood,
            kind="empirical",
            targets=targets.to(torch.float64) if targets.is_floating_point() else targets,
            structure=structure,
        )
    valid = {"categorical": targets.clamp(0, 2).round(), "bernoulli": targets.clamp(0, 1)}
    fisher(
        model,
        inputs,
        likelihood=likelihood,
        kind="empirical",
        targets=valid.get(likelihood, targets.clamp_min(0)),
        structure=structure,
    )
