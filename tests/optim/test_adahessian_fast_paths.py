"""AdaHessian's leaner step: the same Rademacher draws, one-synchronisation finiteness checks.

The signs are drawn directly in the parameter's dtype; they must be the very signs of the
former draw (``2 · randint − 1`` in int64, then cast), so that a seeded run reproduces. The
finiteness of all gradients (and of all estimates) is decided at once, exactly as
``torch.isfinite`` would decide it tensor by tensor.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from natgrad.optim import AdaHessian
from natgrad.optim.adahessian import rademacher_like


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 1, 3, 3)])
def test_signs_are_the_int64_draw_cast(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    generator, twin = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    signs = rademacher_like(torch.empty(shape, dtype=dtype), generator)
    expected = (2 * torch.randint(0, 2, shape, generator=twin) - 1).to(dtype)
    assert signs.dtype == dtype
    assert torch.equal(signs, expected)
    assert torch.equal(generator.get_state(), twin.get_state())


def test_one_bad_gradient_refuses_the_step_for_every_parameter() -> None:
    good, bad = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    optimizer = AdaHessian([good, bad], generator=torch.Generator().manual_seed(0))
    generator_state = optimizer.generator.get_state()
    loss = (good**2).sum() + (bad * torch.tensor([1.0, float("inf"), 2.0])).sum()
    loss.backward(create_graph=True)
    with pytest.warns(RuntimeWarning, match="a gradient is not finite"):
        optimizer.step()
    assert torch.equal(good.detach(), torch.ones(2))
    assert torch.equal(bad.detach(), torch.ones(3))
    assert len(optimizer.state[good]) == len(optimizer.state[bad]) == 0
    assert torch.equal(optimizer.generator.get_state(), generator_state)  # no signs drawn


def test_a_process_group_of_the_wrong_kind_is_refused_by_name() -> None:
    with pytest.raises(TypeError, match=r"process_group must be .* got str"):
        AdaHessian([nn.Parameter(torch.ones(2))], process_group="world")
