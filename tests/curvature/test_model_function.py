"""ModelFunction's forward-mode products against per-sample Jacobians (float64 brute force)."""

import pytest
import torch
from brute_force import DTYPE, FlatModel, tiny_mlp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from natgrad.curvature.jacobians import ModelFunction


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), directions=st.integers(1, 3))
def test_output_tangents_are_jacobian_vector_products(seed: int, directions: int) -> None:
    model = tiny_mlp(seed=seed % 7)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(5, 3, generator=generator, dtype=DTYPE)
    function = ModelFunction(model, inputs)
    vectors = torch.randn(directions, sum(function.param_numels), generator=generator, dtype=DTYPE)
    outputs, tangents = function.output_tangents([function.unflatten(v) for v in vectors])
    jacobians = FlatModel(model).jacobians(inputs)  # (N, C, P)
    torch.testing.assert_close(outputs, model(inputs).detach())
    assert len(tangents) == directions
    for vector, tangent in zip(vectors, tangents, strict=True):
        torch.testing.assert_close(tangent, jacobians @ vector)


def test_output_tangents_of_a_parameter_the_outputs_do_not_use_are_zero() -> None:
    model = nn.Sequential(nn.Linear(3, 2)).to(DTYPE)
    model.register_parameter("unused", nn.Parameter(torch.ones(4, dtype=DTYPE)))
    inputs = torch.ones(2, 3, dtype=DTYPE)
    function = ModelFunction(model, inputs)
    direction = {name: torch.zeros_like(value) for name, value in function.params.items()}
    direction["unused"] = torch.ones(4, dtype=DTYPE)
    _, (tangent,) = function.output_tangents([direction])
    torch.testing.assert_close(tangent, torch.zeros(2, 2, dtype=DTYPE))


def test_output_tangents_runs_without_recording_gradients() -> None:
    model = tiny_mlp()
    seen = []
    model[0].register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    function = ModelFunction(model, torch.ones(2, 3, dtype=DTYPE))
    function.output_tangents([function.params])
    assert seen == [False]
    with pytest.raises(ValueError, match="at least one direction"):
        function.output_tangents([])
