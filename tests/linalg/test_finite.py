"""``all_finite`` decides finiteness as ``torch.isfinite`` does, tensor by tensor: also for
finite values whose norm overflows, subnormals, mixed dtypes, integer and empty tensors."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from natgrad.linalg.finite import all_finite

values = st.sampled_from(
    [
        0.0,
        -1.0,
        3e38,
        -3e38,
        1e308,
        -1e308,
        1e-45,
        5e-324,
        float("nan"),
        float("inf"),
        -float("inf"),
    ]
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.lists(values, max_size=5), st.sampled_from(["float32", "float64", "int64"]))
    )
)
def test_all_finite_agrees_with_isfinite(tensors) -> None:
    built = []
    for entries, dtype in tensors:
        if dtype == "int64":
            entries = [int(value) for value in entries if abs(value) < 1e18]
        built.append(torch.tensor(entries, dtype=getattr(torch, dtype)))
    assert all_finite(*built) == all(bool(torch.isfinite(t).all()) for t in built)


def test_no_tensors_are_finite() -> None:
    assert all_finite()
