"""natgrad.rl with the policy and value function on a device.

The environments step on the CPU; observations go to the policy's device, actions come back,
the batch, the advantages and the update live on the policy's device. Each test runs on
``"cpu"`` and, where CUDA is available, on ``"cuda"``: the float32 run on the device is
compared with the float64 run on the CPU from the same seeds (the CPU generator of the
actions gives the same draws on every device). On the CPU this checks the float32 path
against float64; on CUDA it also checks that nothing is created on the wrong device. The
``"meta"`` device stands in for a second device where no GPU is present.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import gymnasium as gym
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from devices import DEVICES
from natgrad.rl import (
    NPG,
    TRPO,
    CategoricalMLPPolicy,
    GaussianMLPPolicy,
    PolicyGradient,
    RolloutCollector,
    ValueFunction,
    VanillaPolicyGradient,
    make_policy,
    train,
)

NARROW, WIDE = torch.float32, torch.float64
SAMPLING = settings(max_examples=10, deadline=None)  # the first CUDA call is slow


@pytest.fixture(autouse=True)
def ieee_float32() -> Iterator[None]:
    """CUDA float32 matrix products round as IEEE float32 (no TF32) during each test."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def agent_on(
    agent_class: type[PolicyGradient], env_id: str, device: str, dtype: torch.dtype
) -> PolicyGradient:
    """An agent whose (8,)-hidden policy and value function, seeded 0, are on ``device``.

    NPG and TRPO get ``cg_damping=0.1``: with the default 0.01, float32 conjugate gradients
    on Pendulum's ill-conditioned Fisher leave a first step 1e-2 (relative) from float64.
    """
    generator = torch.Generator().manual_seed(0)
    policy = make_policy(gym.make(env_id), (8,), generator).to(device, dtype)
    value_function = ValueFunction(policy.obs_dim, (8,), generator).to(device, dtype)
    options = {"cg_damping": 0.1} if issubclass(agent_class, NPG) else {}
    return agent_class(policy, value_function, **options)


def parameters(agent: PolicyGradient) -> Tensor:
    """The policy's then the value function's parameters, one flat float64 CPU vector."""
    modules = (agent.policy, agent.value_function)
    return torch.cat(
        [p.detach().reshape(-1).cpu().to(WIDE) for m in modules for p in m.parameters()]
    )


def assert_on(agent: PolicyGradient, device: str) -> None:
    for module in (agent.policy, agent.value_function):
        for parameter in module.parameters():
            assert parameter.device.type == device and parameter.dtype == NARROW


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("agent_class", "env_id"),
    [(NPG, "CartPole-v1"), (TRPO, "Pendulum-v1"), (VanillaPolicyGradient, "CartPole-v1")],
)
def test_training_on_device_equals_float64_cpu_training(agent_class, env_id, device):
    """Two iterations of 64 steps from the same seeds, parameters and statistics to float32
    tolerance; the parameters stay on the device."""
    agent = agent_on(agent_class, env_id, device, NARROW)
    logs = train(agent, gym.make(env_id), iterations=2, steps_per_iteration=64, random_state=5)
    oracle = agent_on(agent_class, env_id, "cpu", WIDE)
    start = parameters(oracle)
    expected_logs = train(
        oracle, gym.make(env_id), iterations=2, steps_per_iteration=64, random_state=5
    )

    assert_on(agent, device)
    assert [log.episodes for log in logs] == [log.episodes for log in expected_logs]
    expected = parameters(oracle)
    assert float((expected - start).abs().max()) > 1e-2  # the comparison is not of two starts
    torch.testing.assert_close(parameters(agent), expected, rtol=1e-4, atol=1e-4)
    for log, expected_log in zip(logs, expected_logs, strict=True):
        assert log.stats.keys() == expected_log.stats.keys()
        for key, value in log.stats.items():
            assert value == pytest.approx(expected_log.stats[key], rel=1e-3, abs=1e-5), key


@pytest.mark.parametrize("device", DEVICES)
def test_batch_on_device_holds_the_float64_cpu_batch(device):
    """The batch lives on the policy's device, in its dtype, with the actions (exactly, for
    a categorical policy) and the states of the float64 CPU collection with the same seed."""
    actual = agent_on(VanillaPolicyGradient, "CartPole-v1", device, NARROW)
    expected = agent_on(VanillaPolicyGradient, "CartPole-v1", "cpu", WIDE)
    batches = [
        RolloutCollector(gym.make("CartPole-v1"), random_state=2).collect(agent.policy, 100)
        for agent in (actual, expected)
    ]
    for name in ("observations", "next_observations", "rewards"):  # float32 in CartPole
        tensor = getattr(batches[0], name)
        assert tensor.device.type == device and tensor.dtype == NARROW, name
        assert torch.equal(tensor.cpu().to(WIDE), getattr(batches[1], name)), name
    for name in ("actions", "terminated", "episode_ends"):
        tensor = getattr(batches[0], name)
        assert tensor.device.type == device, name
        assert torch.equal(tensor.cpu(), getattr(batches[1], name)), name
    assert bool(batches[0].terminated.any())  # episodes ended inside the batch


@pytest.mark.parametrize("device", DEVICES)
@SAMPLING
@given(seed=st.integers(0, 2**31 - 1), states=st.integers(1, 40))
def test_gaussian_sample_with_a_cpu_generator_is_mean_plus_std_times_the_cpu_draws(
    device, seed, states
):
    policy = GaussianMLPPolicy(
        3, 2, (8,), log_std_init=-0.5, generator=torch.Generator().manual_seed(1)
    )
    observations = torch.randn(states, 3, generator=torch.Generator().manual_seed(seed))
    actions = policy.to(device).sample(observations.to(device), torch.Generator().manual_seed(seed))

    wide = policy.to("cpu", WIDE)
    with torch.no_grad():
        mean, log_std = wide(observations.to(WIDE))
    draws = torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))
    assert actions.device.type == device and actions.dtype == NARROW
    expected = mean + log_std.exp() * draws.to(WIDE)
    torch.testing.assert_close(actions.cpu().to(WIDE), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@SAMPLING
@given(seed=st.integers(0, 2**31 - 1), states=st.integers(1, 40))
def test_categorical_sample_with_a_cpu_generator_is_the_float64_cpu_sample(device, seed, states):
    policy = CategoricalMLPPolicy(3, 4, (8,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # logits of order 1: every action has a fair chance
        policy.logits[-1].weight.mul_(100.0)
    observations = torch.randn(states, 3, generator=torch.Generator().manual_seed(seed))
    actual = policy.to(device).sample(observations.to(device), torch.Generator().manual_seed(seed))
    expected = policy.to("cpu", WIDE).sample(
        observations.to(WIDE), torch.Generator().manual_seed(seed)
    )
    assert actual.device.type == device and actual.dtype == torch.int64
    assert torch.equal(actual.cpu(), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_a_run_saved_on_device_and_loaded_with_map_location_continues(device):
    """``torch.load(..., map_location=device)`` puts the rollout stream's tensors (generator
    state, episode actions, observation) on the device too; training continues the stream."""
    uninterrupted = agent_on(NPG, "Pendulum-v1", device, NARROW)
    train(
        uninterrupted, gym.make("Pendulum-v1"), iterations=3, steps_per_iteration=50, random_state=4
    )

    interrupted = agent_on(NPG, "Pendulum-v1", device, NARROW)
    train(
        interrupted, gym.make("Pendulum-v1"), iterations=2, steps_per_iteration=50, random_state=4
    )
    buffer = io.BytesIO()
    torch.save(interrupted.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True, map_location=device)
    assert state["rollouts"]["generator_state"].device.type == device
    resumed = agent_on(NPG, "Pendulum-v1", device, NARROW)
    resumed.load_state_dict(state)
    train(resumed, gym.make("Pendulum-v1"), iterations=1, steps_per_iteration=50, random_state=4)

    assert_on(resumed, device)
    assert resumed.rollout_state["env_steps"] == 150
    torch.testing.assert_close(parameters(resumed), parameters(uninterrupted), rtol=0, atol=1e-6)


def test_a_cpu_generator_draws_on_the_cpu_for_a_policy_on_another_device():
    """The Gaussian noise is drawn on the generator's device and moved to the policy's: on a
    policy on ``meta`` it advances the CPU generator as a CPU policy's sample does."""
    policy = GaussianMLPPolicy(3, 2, (4,))
    on_cpu, elsewhere = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    policy.sample(torch.zeros(5, 3), on_cpu)
    actions = policy.to("meta").sample(torch.zeros(5, 3, device="meta"), elsewhere)
    assert actions.device.type == "meta" and actions.shape == (5, 2)
    assert torch.equal(elsewhere.get_state(), on_cpu.get_state())


def test_a_value_function_on_another_device_than_the_policy_is_refused():
    policy = CategoricalMLPPolicy(4, 2, (4,))
    with pytest.raises(ValueError, match="value_function is on meta but the policy is on cpu"):
        NPG(policy, ValueFunction(4, (4,)).to("meta"))
