"""A resumed run continues its random stream: ``train(k)`` twice, or ``train(k)``, save, load
into a fresh agent and a fresh environment, ``train(k)``, is ``train(2k)`` bit for bit."""

import io

import gymnasium as gym
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from natgrad.rl import (
    NPG,
    CategoricalMLPPolicy,
    RolloutCollector,
    ValueFunction,
    VanillaPolicyGradient,
    episode_seed,
    make_policy,
    train,
)
from natgrad.rl.policy_fisher import flat_parameters

STEPS = 75  # Pendulum's episodes last 200 steps: every split falls inside an episode


def fresh_agent(agent_class, env_id, seed=0):
    generator = torch.Generator().manual_seed(seed)
    policy = make_policy(gym.make(env_id), (8,), generator)
    return agent_class(policy, ValueFunction(policy.obs_dim, (8,), generator))


def all_parameters(agent):
    value = torch.nn.utils.parameters_to_vector(agent.value_function.parameters()).detach()
    return torch.cat([flat_parameters(agent.policy), value])


def saved_and_loaded(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_same_logs(logs, expected):
    assert [(log.iteration, log.env_steps, log.episodes) for log in logs] == [
        (log.iteration, log.env_steps, log.episodes) for log in expected
    ]
    assert [log.stats for log in logs] == [log.stats for log in expected]


@pytest.mark.parametrize(
    ("agent_class", "env_id"), [(NPG, "Pendulum-v1"), (VanillaPolicyGradient, "CartPole-v1")]
)
def test_two_calls_of_train_are_one_call_of_twice_the_length(agent_class, env_id):
    uninterrupted = fresh_agent(agent_class, env_id)
    whole = train(
        uninterrupted, gym.make(env_id), iterations=4, steps_per_iteration=STEPS, random_state=3
    )

    resumed = fresh_agent(agent_class, env_id)
    env = gym.make(env_id)
    first = train(resumed, env, iterations=2, steps_per_iteration=STEPS, random_state=3)
    env.reset(seed=123)  # the environment used in between, e.g. to evaluate the policy
    env.step(env.action_space.sample())
    second = train(resumed, env, iterations=2, steps_per_iteration=STEPS, random_state=3)

    assert torch.equal(all_parameters(resumed), all_parameters(uninterrupted))
    assert_same_logs(first + second, whole)


@pytest.mark.parametrize(
    ("agent_class", "env_id"), [(NPG, "Pendulum-v1"), (VanillaPolicyGradient, "CartPole-v1")]
)
def test_a_saved_run_loaded_into_a_fresh_agent_and_environment_continues(agent_class, env_id):
    uninterrupted = fresh_agent(agent_class, env_id)
    whole = train(
        uninterrupted, gym.make(env_id), iterations=4, steps_per_iteration=STEPS, random_state=3
    )

    interrupted = fresh_agent(agent_class, env_id)
    train(interrupted, gym.make(env_id), iterations=2, steps_per_iteration=STEPS, random_state=3)
    state = saved_and_loaded(interrupted.state_dict())
    resumed = fresh_agent(agent_class, env_id, seed=9)  # other weights, fresh optimizers
    resumed.load_state_dict(state)
    second = train(
        resumed, gym.make(env_id), iterations=2, steps_per_iteration=STEPS, random_state=3
    )

    assert torch.equal(all_parameters(resumed), all_parameters(uninterrupted))
    assert_same_logs(second, whole[2:])


def test_the_same_seed_on_fresh_agents_gives_the_same_run_and_another_seed_a_new_stream():
    def run(agent, seed):
        return train(
            agent, gym.make("CartPole-v1"), iterations=2, steps_per_iteration=60, random_state=seed
        )

    agent, twin = fresh_agent(NPG, "CartPole-v1"), fresh_agent(NPG, "CartPole-v1")
    run(agent, 0)
    run(twin, 0)
    assert torch.equal(all_parameters(agent), all_parameters(twin))
    logs = run(agent, 1)  # a new seed starts its own stream
    assert [log.env_steps for log in logs] == [60, 120]
    assert agent.rollout_state["random_state"] == 1


class ReplayEnv(gym.Env):
    """Deterministic given the reset seed and the actions; ``Discrete(3, start=-1)``; the
    observation buffer is reused; episodes of 7 steps, terminated when the sum leaves ±3."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), dtype=np.float64)
    action_space = gym.spaces.Discrete(3, start=-1)

    def __init__(self):
        self._buffer = np.zeros(2)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self._buffer[:] = (self.np_random.normal(), 0.0)
        return self._buffer, {}

    def step(self, action):
        assert self.action_space.contains(action)
        self._buffer += (action * self.np_random.uniform(), 1.0)
        terminated = abs(self._buffer[0]) > 3.0
        return self._buffer, float(self._buffer[0]), terminated, self._buffer[1] >= 7, {}


def concatenated(batches):
    fields = ("observations", "next_observations", "actions", "rewards", "terminated")
    joined = {name: torch.cat([getattr(b, name) for b in batches]) for name in fields}
    joined["episode_returns"] = sum((b.episode_returns for b in batches), ())
    return joined


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 12), min_size=2, max_size=5),
    save_after=st.integers(0, 4),
    seed=st.integers(0, 2**32),
)
def test_batches_split_and_resumed_anywhere_are_the_uninterrupted_stream(sizes, save_after, seed):
    policy = CategoricalMLPPolicy(2, 3, (4,), torch.Generator().manual_seed(0))
    whole = RolloutCollector(ReplayEnv(), seed).collect(policy, sum(sizes))

    collector = RolloutCollector(ReplayEnv(), seed)
    batches = []
    for index, size in enumerate(sizes):
        if index == save_after:
            state = saved_and_loaded(collector.state_dict())
            collector = RolloutCollector.from_state_dict(ReplayEnv(), state)
        batches.append(collector.collect(policy, size))

    assert collector.env_steps == sum(sizes) and collector.batches == len(sizes)
    split = concatenated(batches)
    for name, value in split.items():
        expected = getattr(whole, name)
        assert (value == expected) if name == "episode_returns" else torch.equal(value, expected)


def test_episodes_start_from_their_documented_seeds():
    env = ReplayEnv()
    collector = RolloutCollector(env, 5)
    policy = CategoricalMLPPolicy(2, 3, (4,), torch.Generator().manual_seed(0))
    batch = collector.collect(policy, 40)
    starts = [0, *(torch.nonzero(batch.episode_ends[:-1]).flatten() + 1).tolist()]
    reference = ReplayEnv()
    for episode, start in enumerate(starts):
        observation, _ = reference.reset(seed=episode_seed(5, episode))
        assert torch.equal(batch.observations[start], torch.from_numpy(observation).float())


class UnseededEnv(ReplayEnv):
    """Ignores the reset seed: its state does not follow from the seed and the actions."""

    def reset(self, seed=None, options=None):
        return super().reset(seed=None)


def test_a_stream_that_does_not_replay_or_another_environment_is_refused():
    policy = CategoricalMLPPolicy(2, 3, (4,), torch.Generator().manual_seed(0))
    collector = RolloutCollector(UnseededEnv(), 0)
    collector.collect(policy, 3)
    # the replay diverges: at the observation, or (an unseeded start near ±3) by ending early
    with pytest.raises(ValueError, match=r"observation|does not reproduce the saved episode"):
        RolloutCollector.from_state_dict(UnseededEnv(), collector.state_dict())

    agent = fresh_agent(NPG, "CartPole-v1")
    train(agent, gym.make("CartPole-v1"), iterations=1, steps_per_iteration=10, random_state=0)
    with pytest.raises(ValueError, match="CartPole-v1"):
        train(agent, gym.make("Acrobot-v1"), iterations=1, steps_per_iteration=10, random_state=0)


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        ("episode", -1, ValueError),
        ("env_steps", 1.5, TypeError),
        ("episode_return", float("nan"), ValueError),
        ("generator_state", torch.zeros(3, dtype=torch.uint8), ValueError),
        ("observation", torch.zeros(2, 2), ValueError),
        ("env_id", 7, ValueError),
    ],
)
def test_a_corrupted_rollout_state_is_refused_by_name_before_anything_loads(key, value, error):
    agent = fresh_agent(VanillaPolicyGradient, "CartPole-v1")
    train(agent, gym.make("CartPole-v1"), iterations=1, steps_per_iteration=10, random_state=0)
    state = agent.state_dict()
    state["rollouts"][key] = value
    target = fresh_agent(VanillaPolicyGradient, "CartPole-v1", seed=4)
    before = all_parameters(target)
    with pytest.raises(error, match=key):
        target.load_state_dict(state)
    assert torch.equal(all_parameters(target), before) and target.rollout_state is None

    del state["rollouts"]
    with pytest.raises(ValueError, match="rollouts"):
        target.load_state_dict(state)


def test_a_negative_seed_is_refused_by_name():
    with pytest.raises(ValueError, match="random_state"):
        RolloutCollector(gym.make("CartPole-v1"), -1)
