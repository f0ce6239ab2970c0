"""The policy Fisher as a matrix-free curvature operator: Hessian of the mean KL.

For a policy ``π_θ`` and visited states ``s₁..s_N`` the Fisher over the policy parameters is

    F(θ) = 1/N Σₙ E_{a∼π_θ(·|sₙ)}[∇ log π_θ(a|sₙ) ∇ log π_θ(a|sₙ)ᵀ] = ∇²_θ' KL̄(θ, θ')|_{θ'=θ},

with ``KL̄(θ, θ') = 1/N Σₙ KL(π_θ(·|sₙ) ‖ π_θ'(·|sₙ))`` the MEAN KL over states (Kakade 2001;
Schulman et al. 2015). Products ``F v`` are forward-over-reverse ``torch.func`` Hessian-vector
products of the closed-form KL; the operator is a :class:`natgrad.curvature.Implicit`.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import functional_call, grad, jvp

from natgrad.curvature import Implicit
from natgrad.rl.policies import Policy


def trainable_parameters(policy: Policy) -> dict[str, Tensor]:
    """The policy's parameters with ``requires_grad=True``, by name, in ``parameters()`` order.

    Raises
    ------
    ValueError
        If every parameter of ``policy`` is frozen (``requires_grad=False``).
    """
    trainable = {name: p for name, p in policy.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError(
            f"{type(policy).__name__} has no trainable parameters (all have requires_grad=False)"
        )
    return trainable


def flat_parameters(policy: Policy) -> Tensor:
    """Detached flat vector of the trainable parameters, shape ``(P,)``."""
    return torch.cat([p.detach().reshape(-1) for p in trainable_parameters(policy).values()])


def set_flat_parameters(policy: Policy, flat: Tensor) -> None:
    """Overwrite the trainable parameters from a flat vector of shape ``(P,)``."""
    offset = 0
    with torch.no_grad():
        for parameter in trainable_parameters(policy).values():
            size = parameter.numel()
            parameter.copy_(flat[offset : offset + size].view_as(parameter))
            offset += size


def _unflatten(flat: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    pieces = torch.split(flat, [p.numel() for p in like.values()])
    return {name: piece.view_as(p) for (name, p), piece in zip(like.items(), pieces, strict=True)}


def mean_kl(policy: Policy, observations: Tensor, old_outputs: tuple[Tensor, ...]) -> Tensor:
    """Exact ``1/N Σₙ KL(π_old(·|sₙ) ‖ π(·|sₙ))`` at the policy's current parameters (scalar).

    Parameters
    ----------
    policy : Policy
    observations : Tensor of shape (N, obs_dim)
    old_outputs : tuple of Tensor
        ``policy(observations)`` evaluated at the old parameters (detached).
    """
    return policy.kl_divergence(old_outputs, policy(observations)).mean()


def policy_kl_fisher(
    policy: Policy, observations: Tensor, *, cg_max_iter: int | None = None
) -> Implicit:
    """Fisher of ``policy`` over ``observations`` as KL Hessian-vector products.

    Parameters
    ----------
    policy : Policy
        Evaluated at its current parameters; only trainable parameters are included, in
        ``parameters()`` order (the flat order of ``parameters_to_vector``).
    observations : Tensor of shape (N, obs_dim)
        Visited states; the Fisher is the MEAN over them.
    cg_max_iter : int, optional
        Iteration cap of the operator's conjugate-gradient ``solve``.

    Returns
    -------
    Implicit
        ``F`` of shape ``(P, P)``: ``mv`` costs one forward-over-reverse pass over the ``N``
        states; ``to_dense`` is for small policies only.

    Raises
    ------
    TypeError
        If ``policy`` is not a :class:`Policy`.
    ValueError
        If ``observations`` is not finite or has the wrong shape, or no parameter of
        ``policy`` is trainable.
    """
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a natgrad.rl.Policy, got {type(policy).__name__}")
    if not bool(torch.isfinite(observations).all()):
        raise ValueError("observations must not contain infs or NaNs")
    parameters = {name: p.detach() for name, p in trainable_parameters(policy).items()}
    point = torch.cat([p.reshape(-1) for p in parameters.values()])
    with torch.no_grad():
        old_outputs = tuple(t.detach() for t in policy(observations))

    def kl_at(flat: Tensor) -> Tensor:
        outputs = functional_call(policy, _unflatten(flat, parameters), (observations,))
        return policy.kl_divergence(old_outputs, outputs).mean()

    kl_gradient = grad(kl_at)

    def fisher_vector_product(vector: Tensor) -> Tensor:
        return jvp(kl_gradient, (point,), (vector,))[1]

    return Implicit(
        fisher_vector_product,
        [p.shape for p in parameters.values()],
        point.dtype,
        point.device,
        cg_max_iter=cg_max_iter,
    )
