"""Stochastic MLP policies: categorical (discrete actions) and diagonal Gaussian (continuous)."""

from __future__ import annotations

import abc
import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Distribution, Independent, Normal

from natgrad._random import drawing_device
from natgrad._validation import finite_float, positive_int


def mlp(
    in_features: int,
    out_features: int,
    hidden_sizes: Sequence[int],
    generator: torch.Generator | None = None,
    *,
    output_gain: float = 1.0,
) -> nn.Sequential:
    """A tanh MLP with orthogonal initialisation drawn from ``generator``.

    Parameters
    ----------
    in_features, out_features : int
        Input and output widths.
    hidden_sizes : sequence of int
        Widths of the hidden layers (may be empty: a linear map).
    generator : torch.Generator, optional
        Source of the initial weights; the global generator if omitted.
    output_gain : float, default 1.0
        Gain of the last layer's orthogonal initialisation (small for policy heads).

    Returns
    -------
    nn.Sequential
        Maps ``(N, in_features)`` to ``(N, out_features)``; biases start at zero.
    """
    widths = [
        positive_int("in_features", in_features),
        *(positive_int("hidden size", h) for h in hidden_sizes),
        positive_int("out_features", out_features),
    ]
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        linear = nn.Linear(fan_in, fan_out)
        is_last = index == len(widths) - 2
        gain = output_gain if is_last else math.sqrt(2.0)
        with torch.no_grad():
            linear.weight.copy_(_orthogonal_like(linear.weight, gain, generator))
            linear.bias.zero_()
        layers.append(linear)
        if not is_last:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def _orthogonal_like(weight: Tensor, gain: float, generator: torch.Generator | None) -> Tensor:
    """An orthogonal initialisation of ``weight``'s shape drawn on the generator's device
    (:func:`~natgrad._random.drawing_device`): a CPU generator gives the same weights for a
    layer built on any device, e.g. under ``torch.set_default_device("cuda")``."""
    drawn = torch.empty(weight.shape, dtype=weight.dtype, device=drawing_device(generator, weight))
    return nn.init.orthogonal_(drawn, gain=gain, generator=generator)


class Policy(nn.Module, abc.ABC):
    """A stochastic policy ``π(a | s)`` whose parameters are the module's parameters.

    ``forward(observations)`` returns the distribution parameters of ``π(· | sₙ)`` for a batch
    of ``N`` states as a tuple of tensors with leading dimension ``N``; subclasses also give
    the distribution and the closed-form KL divergence in terms of those tensors, so that the
    KL is a pure function that ``torch.func`` can differentiate twice (see
    :func:`natgrad.rl.policy_kl_fisher`).
    """

    obs_dim: int

    @abc.abstractmethod
    def forward(self, observations: Tensor) -> tuple[Tensor, ...]:
        """Distribution parameters of ``π(· | sₙ)`` for observations of shape ``(N, obs_dim)``."""

    @abc.abstractmethod
    def distribution_from(self, outputs: tuple[Tensor, ...]) -> Distribution:
        """``π(· | sₙ)`` from :meth:`forward`'s outputs, batch shape ``(N,)``."""

    @abc.abstractmethod
    def kl_divergence(self, old: tuple[Tensor, ...], new: tuple[Tensor, ...]) -> Tensor:
        """``KL(π_old(· | sₙ) ‖ π_new(· | sₙ))`` per state, shape ``(N,)``, in closed form."""

    @abc.abstractmethod
    def sample(self, observations: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw one action per state with ``generator`` (no gradient).

        The random draws happen on the generator's device (the observations' device when it
        is ``None``) and the actions are returned on the observations' device: a CPU generator
        gives the same actions for a policy on the CPU or on a GPU.
        """

    def distribution(self, observations: Tensor) -> Distribution:
        """``π(· | sₙ)`` for observations of shape ``(N, obs_dim)``, batch shape ``(N,)``."""
        return self.distribution_from(self(observations))

    def log_prob(self, observations: Tensor, actions: Tensor) -> Tensor:
        """``log π(aₙ | sₙ)``, shape ``(N,)``.

        Parameters
        ----------
        observations : Tensor of shape (N, obs_dim)
        actions : Tensor of shape (N,) (categorical) or (N, action_dim) (Gaussian)
            As :meth:`sample` returns them.

        Raises
        ------
        ValueError
            If ``actions`` has another shape (it would broadcast to a wrong result).
        """
        distribution = self.distribution(observations)
        expected = tuple(distribution.batch_shape + distribution.event_shape)
        if tuple(actions.shape) != expected:
            raise ValueError(f"actions must have shape {expected}, got {tuple(actions.shape)}")
        return distribution.log_prob(actions)

    def _check_observations(self, observations: Tensor) -> None:
        if observations.ndim != 2 or observations.shape[1] != self.obs_dim:
            raise ValueError(
                f"observations must have shape (N, {self.obs_dim}), got {tuple(observations.shape)}"
            )


class CategoricalMLPPolicy(Policy):
    """Softmax policy over ``n_actions`` discrete actions with an MLP producing the logits.

    Parameters
    ----------
    obs_dim : int
        Observation size.
    n_actions : int
        Number of actions.
    hidden_sizes : sequence of int, default (32, 32)
        Hidden widths of the logit network.
    generator : torch.Generator, optional
        Source of the initial weights.
    """

    def __init__(
        self,
        obs_dim: int,
        n_actions: int,
        hidden_sizes: Sequence[int] = (32, 32),
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.obs_dim = positive_int("obs_dim", obs_dim)
        self.n_actions = positive_int("n_actions", n_actions)
        self.logits = mlp(obs_dim, n_actions, hidden_sizes, generator, output_gain=0.01)

    def forward(self, observations: Tensor) -> tuple[Tensor]:
        """``(log_probs,)``: normalised log-probabilities of shape ``(N, n_actions)``."""
        self._check_observations(observations)
        return (torch.log_softmax(self.logits(observations), dim=-1),)

    def distribution_from(self, outputs: tuple[Tensor, ...]) -> Categorical:
        return Categorical(logits=outputs[0], validate_args=False)

    def kl_divergence(self, old: tuple[Tensor, ...], new: tuple[Tensor, ...]) -> Tensor:
        old_log_probs, new_log_probs = old[0], new[0]
        return (old_log_probs.exp() * (old_log_probs - new_log_probs)).sum(-1)

    def sample(self, observations: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Actions of shape ``(N,)`` (int64)."""
        with torch.no_grad():
            probs = self(observations)[0].exp()
            drawing_probs = probs.to(drawing_device(generator, probs))
            actions = torch.multinomial(drawing_probs, 1, generator=generator).squeeze(-1)
            return actions.to(probs.device)


class GaussianMLPPolicy(Policy):
    """Diagonal Gaussian policy ``N(m(s), diag σ²)`` with a state-independent learned ``log σ``.

    Parameters
    ----------
    obs_dim : int
        Observation size.
    action_dim : int
        Action size.
    hidden_sizes : sequence of int, default (32, 32)
        Hidden widths of the mean network.
    log_std_init : float, default 0.0
        Initial ``log σ`` of every action dimension.
    generator : torch.Generator, optional
        Source of the initial weights.

    Notes
    -----
    In ``parameters()`` order (the flat order of the Fisher), ``log_std`` of shape
    ``(action_dim,)`` comes first, then the parameters of ``mean``.
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden_sizes: Sequence[int] = (32, 32),
        log_std_init: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.obs_dim = positive_int("obs_dim", obs_dim)
        self.action_dim = positive_int("action_dim", action_dim)
        log_std_init = finite_float("log_std_init", log_std_init)
        self.mean = mlp(obs_dim, action_dim, hidden_sizes, generator, output_gain=0.01)
        self.log_std = nn.Parameter(torch.full((action_dim,), log_std_init))

    def forward(self, observations: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, log_std)``, both of shape ``(N, action_dim)`` (new tensors, not views)."""
        self._check_observations(observations)
        mean = self.mean(observations)
        return mean, torch.zeros_like(mean) + self.log_std

    def distribution_from(self, outputs: tuple[Tensor, ...]) -> Independent:
        mean, log_std = outputs
        return Independent(Normal(mean, log_std.exp(), validate_args=False), 1)

    def kl_divergence(self, old: tuple[Tensor, ...], new: tuple[Tensor, ...]) -> Tensor:
        (old_mean, old_log_std), (new_mean, new_log_std) = old, new
        variance_ratio = torch.exp(2.0 * (old_log_std - new_log_std))
        squared_distance = ((old_mean - new_mean) * torch.exp(-new_log_std)).square()
        per_dim = 0.5 * (variance_ratio + squared_distance - 1.0) - (old_log_std - new_log_std)
        return per_dim.sum(-1)

    def sample(self, observations: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Actions of shape ``(N, action_dim)``."""
        with torch.no_grad():
            mean, log_std = self(observations)
            device = drawing_device(generator, mean)
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=device)
            return mean + log_std.exp() * noise.to(mean.device)
