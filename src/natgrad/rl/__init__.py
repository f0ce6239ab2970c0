"""natgrad.rl: natural policy gradient and TRPO on gymnasium environments.

The policy Fisher is the MEAN over visited states of the per-state Fisher of ``π(·|s)``,
available matrix-free as the Hessian of the mean KL (:func:`policy_kl_fisher`, a
:class:`natgrad.curvature.Implicit` operator). :class:`NPG` solves ``(F + λI) d = g`` by
conjugate gradients and steps to the quadratic trust-region boundary ``½ dᵀFd = δ``, halving
the step while its exact KL exceeds ``kl_tolerance · δ``; :class:`TRPO` backtracks until the
exact KL is at most ``δ`` and the surrogate improves. :func:`train` continues an agent's
rollout stream across calls and through ``state_dict``/``load_state_dict``.
"""

from natgrad.rl.advantages import gae_advantages
from natgrad.rl.npg import NPG
from natgrad.rl.policies import CategoricalMLPPolicy, GaussianMLPPolicy, Policy, mlp
from natgrad.rl.policy_fisher import mean_kl, policy_kl_fisher
from natgrad.rl.policy_gradient import PolicyGradient, VanillaPolicyGradient
from natgrad.rl.rollouts import RolloutBatch, RolloutCollector, episode_seed, make_policy
from natgrad.rl.training import IterationLog, train
from natgrad.rl.trpo import TRPO
from natgrad.rl.value import ValueFunction, fit_value_function

__all__ = [
    "NPG",
    "TRPO",
    "CategoricalMLPPolicy",
    "GaussianMLPPolicy",
    "IterationLog",
    "Policy",
    "PolicyGradient",
    "RolloutBatch",
    "RolloutCollector",
    "ValueFunction",
    "VanillaPolicyGradient",
    "episode_seed",
    "fit_value_function",
    "gae_advantages",
    "make_policy",
    "mean_kl",
    "mlp",
    "policy_kl_fisher",
    "train",
]
