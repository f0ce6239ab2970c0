"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import settings

# The suite draws the same hypothesis examples on every run, so that CI passes or fails on the
# code alone; ``pytest --hypothesis-profile=explore`` draws fresh examples (and replays the
# failures saved in the local example database) to look for new counterexamples.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile("deterministic")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several xdist workers share the machine's cores: one intra-op thread each avoids
    # oversubscription (results do not depend on the thread count).
    torch.set_num_threads(1)


@pytest.fixture
def float64_default() -> Iterator[None]:
    """Make float64 the default dtype for one test, then restore the previous default.

    Modules whose oracles are float64 opt in with
    ``pytestmark = pytest.mark.usefixtures("float64_default")``.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def cholesky_shapes(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes of the matrices ``torch.linalg.cholesky_ex`` factorises during one test, in
    call order (the calls themselves go through)."""
    original = torch.linalg.cholesky_ex
    shapes: list[tuple[int, ...]] = []

    def recording(matrix, **kwargs):
        shapes.append(tuple(matrix.shape))
        return original(matrix, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", recording)
    return shapes
