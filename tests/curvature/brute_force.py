"""Float64 brute-force curvature oracles, built independently of natgrad.curvature.

Everything is written over the flat trainable-parameter vector with ``torch.func.jacrev`` and
``torch.func.hessian``; the log-partitions and NLLs are written out here rather than taken
from :mod:`natgrad.curvature.likelihoods`.
"""

import itertools
import math

import torch
import torch.nn.functional as functional
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

DTYPE = torch.float64
LIKELIHOOD_NAMES = ("categorical", "gaussian", "bernoulli", "poisson")


def log_partition(name: str, natural: Tensor) -> Tensor:
    """``A(f)`` for one sample's natural parameters ``f`` of shape ``(C,)``."""
    if name == "categorical":
        return torch.logsumexp(natural, dim=-1)
    if name == "gaussian":
        return 0.5 * natural.pow(2).sum()
    if name == "bernoulli":
        return functional.softplus(natural).sum()
    return natural.exp().sum()


def negative_log_likelihood(name: str, natural: Tensor, target: Tensor) -> Tensor:
    """``−log p(y | f)`` up to a constant in ``f``, for one sample."""
    if name == "categorical":
        return torch.logsumexp(natural, dim=-1) - natural.gather(0, target.long().reshape(1)).sum()
    if name == "gaussian":
        return 0.5 * (target - natural).pow(2).sum()
    return log_partition(name, natural) - (target * natural).sum()


def tiny_mlp(outputs: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, outputs)).to(DTYPE)


def tiny_data(likelihood: str, samples: int = 5, outputs: int = 3, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, 3, generator=generator, dtype=DTYPE)
    if likelihood == "categorical":
        targets = torch.randint(0, outputs, (samples,), generator=generator)
    elif likelihood == "gaussian":
        targets = torch.randn(samples, outputs, generator=generator, dtype=DTYPE)
    elif likelihood == "bernoulli":
        targets = torch.randint(0, 2, (samples, outputs), generator=generator).to(DTYPE)
    else:
        targets = torch.randint(0, 4, (samples, outputs), generator=generator).to(DTYPE)
    return inputs, targets


class FlatModel:
    """``(θ, x) ↦ model(x; θ)`` over the flat vector of trainable parameters."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def __call__(self, theta: Tensor, inputs: Tensor) -> Tensor:
        pieces = torch.split(theta, self.sizes)
        params = {
            n: piece.reshape(s) for n, piece, s in zip(self.names, pieces, self.shapes, strict=True)
        }
        return functional_call(self.model, params, (inputs,))

    def jacobians(self, inputs: Tensor) -> Tensor:
        """Per-sample Jacobians of the flattened outputs, ``(N, C, P)``."""

        def single(theta: Tensor, sample: Tensor) -> Tensor:
            return self(theta, sample.unsqueeze(0)).reshape(-1)

        return vmap(jacrev(single), in_dims=(None, 0))(self.theta, inputs)

    def block_slices(self) -> list[slice]:
        offsets = [0, *torch.tensor(self.sizes).cumsum(0).tolist()]
        return [slice(a, b) for a, b in itertools.pairwise(offsets)]


def exact_fisher(model: nn.Module, inputs: Tensor, likelihood: str) -> Tensor:
    """``1/N Σₙ Jₙᵀ ∇²A(fₙ) Jₙ`` with ``∇²A`` from ``torch.func.hessian`` of ``A``."""
    flat = FlatModel(model)
    jacobians = flat.jacobians(inputs)
    outputs = flat(flat.theta, inputs).reshape(len(inputs), -1)
    curvatures = vmap(hessian(lambda f: log_partition(likelihood, f)))(outputs)
    return torch.einsum("nci,ncd,ndj->ij", jacobians, curvatures, jacobians) / len(inputs)


def gradient_fisher(model: nn.Module, inputs: Tensor, likelihood: str, targets: Tensor) -> Tensor:
    """``1/N Σₙ gₙ gₙᵀ`` with ``gₙ = ∇_θ nll(f(xₙ; θ), yₙ)`` at the given targets."""
    flat = FlatModel(model)

    def nll(theta: Tensor, sample: Tensor, target: Tensor) -> Tensor:
        natural = flat(theta, sample.unsqueeze(0)).reshape(-1)
        return negative_log_likelihood(likelihood, natural, target)

    gradients = vmap(grad(nll), in_dims=(None, 0, 0))(flat.theta, inputs, targets)
    return gradients.T @ gradients / len(inputs)


def mc_fisher(model: nn.Module, inputs: Tensor, likelihood: str, draws: list[Tensor]) -> Tensor:
    """Mean of :func:`gradient_fisher` over the given target draws (the MC Fisher)."""
    return sum(gradient_fisher(model, inputs, likelihood, y) for y in draws) / len(draws)


def loss_hessian(model: nn.Module, inputs: Tensor, loss_fn, targets: Tensor) -> Tensor:
    """``∇²_θ loss_fn(model(inputs; θ), targets)`` over the flat parameters."""
    flat = FlatModel(model)
    return hessian(lambda theta: loss_fn(flat(theta, inputs), targets))(flat.theta)


def loss_ggn(model: nn.Module, inputs: Tensor, loss_fn, targets: Tensor) -> Tensor:
    """``Jᵀ ∇²_f L J`` with the full output Hessian of the (possibly non-separable) loss."""
    flat = FlatModel(model)
    outputs = flat(flat.theta, inputs)
    jacobian = flat.jacobians(inputs).reshape(outputs.numel(), -1)
    output_hessian = hessian(lambda f: loss_fn(f, targets))(outputs)
    output_hessian = output_hessian.reshape(outputs.numel(), outputs.numel())
    return jacobian.T @ output_hessian @ jacobian


def block_diagonal(matrix: Tensor, slices: list[slice]) -> list[Tensor]:
    return [matrix[s, s] for s in slices]


def relative_error(estimate: Tensor, reference: Tensor) -> float:
    return float(torch.linalg.norm(estimate - reference) / torch.linalg.norm(reference))


def mc_tolerance(samples: int) -> float:
    """Bound on the relative Frobenius error of an M-sample MC Fisher for the tiny models here.

    The error scales as ``c/√M``; ``c`` is about 1 for these models and data, so ``3/√M`` leaves a
    factor of three.
    """
    return 3.0 / math.sqrt(samples)
