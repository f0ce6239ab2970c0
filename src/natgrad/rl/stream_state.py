"""Checks of a saved rollout stream, the state of :class:`natgrad.rl.RolloutCollector`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import torch
from torch import Tensor

from natgrad._validation import finite_float, nonnegative_int

STREAM_KEYS = frozenset(
    {
        "env_id",
        "random_state",
        "generator_state",
        "env_steps",
        "batches",
        "episode",
        "episode_actions",
        "episode_return",
        "observation",
    }
)


def env_id(env: gym.Env) -> str | None:
    """The ``spec.id`` of ``env`` (``"CartPole-v1"``), or ``None`` if it has no spec."""
    spec = getattr(env, "spec", None)
    return None if spec is None else spec.id


def check_stream_state(state: Mapping[str, Any], name: str = "state_dict") -> None:
    """Raise unless ``state`` is a stream state as ``RolloutCollector.state_dict`` returns it.

    Parameters
    ----------
    state : mapping
    name : str
        How messages name ``state``.

    Raises
    ------
    TypeError
        If ``state`` is not a mapping, or a number in it is not an integer or a real number.
    ValueError
        If a key is missing or unknown, or a value is invalid; the message names the key and
        the value.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"{name} must be a mapping, got {type(state).__name__}")
    if set(state) != STREAM_KEYS:
        raise ValueError(
            f"{name} must have the keys {sorted(STREAM_KEYS)}, got {sorted(map(str, state))}"
        )
    if state["env_id"] is not None and not isinstance(state["env_id"], str):
        raise ValueError(f"{name}['env_id'] must be a string or None, got {state['env_id']!r}")
    for key in ("random_state", "episode", "env_steps", "batches"):
        nonnegative_int(f"{name}[{key!r}]", state[key])
    finite_float(f"{name}['episode_return']", state["episode_return"])
    _check_generator_state(state["generator_state"], f"{name}['generator_state']")
    observation = state["observation"]
    if not isinstance(observation, Tensor) or observation.ndim != 1:
        raise ValueError(f"{name}['observation'] must be a 1-d tensor, got {observation!r}")
    actions = state["episode_actions"]
    if not isinstance(actions, Tensor) or actions.ndim < 1:
        raise ValueError(
            f"{name}['episode_actions'] must be a tensor of shape (L, ...), got {actions!r}"
        )


def _check_generator_state(value: Any, name: str) -> None:
    if not isinstance(value, Tensor) or value.dtype != torch.uint8:
        raise ValueError(f"{name} must be a uint8 tensor, got {value!r}")
    try:
        torch.Generator().set_state(value.cpu())
    except RuntimeError as error:
        raise ValueError(f"{name} is not a valid generator state: {error}") from None
