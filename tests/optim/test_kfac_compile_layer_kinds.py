"""K-FAC/EKFAC on a ``torch.compile``d model whose layers are recorded through recording modes
(recurrent layers, attentions) or expanded inputs (a transposed convolution) train exactly as
on the eager model (:mod:`kfac_layer_kinds`).

On recording steps the recurrent layers' fused kernels and the attentions'
``F.multi_head_attention_forward`` are taken over by a ``TorchFunctionMode`` that TorchDynamo
traces; on the other steps no hook is attached. Three steps (recording, not recording, then
recording again from the cached graphs) must give the eager model's parameters and factors.
The ``aot_eager`` backend traces as ``torch.compile`` does and needs no C++ compiler.

Compiling costs seconds per model, so one model of each recording path runs, in one
configuration: a bidirectional GRU (unrolled recurrent products), a transformer encoder layer
(packed attention projections), an attention with ``kdim``/``vdim`` (separate projections) and
a transposed convolution (expanded inputs). The LSTM with ``proj_size``, the ``nn.LSTMCell``
loop and the decoder layer, whose graphs take longest to build, take the same paths.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from kfac_layer_kinds import batches, make_model, parameters, precondition_options, train_step
from natgrad.optim import EKFAC, KFAC

STEPS = 3


def train(kind: str, cls, fisher_type: str, compiled: bool):
    """Parameters and preconditioner after ``STEPS`` float32 steps."""
    model = make_model(kind, torch.float32)
    precond = cls(model, **precondition_options(fisher_type))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    forward = torch.compile(model, backend="aot_eager") if compiled else model
    for batch in batches(kind, STEPS, 16, torch.float32):
        train_step(forward, precond, optimizer, [batch])
    return parameters(model), precond


@pytest.mark.parametrize(
    ("kind", "cls", "fisher_type"),
    [
        ("gru_bidirectional", EKFAC, "mc"),
        ("encoder", KFAC, "mc"),
        # recording forwards run eagerly: compiled, the weight-locality probe's backward with
        # retain_graph=True went through AOTAutograd's donated buffers and raised
        ("separate_projections", KFAC, "empirical"),
        ("conv_transpose", KFAC, "empirical"),
    ],
)
def test_a_compiled_model_trains_as_the_eager_one(kind: str, cls, fisher_type: str) -> None:
    torch._dynamo.reset()
    eager, eager_precond = train(kind, cls, fisher_type, compiled=False)
    compiled, compiled_precond = train(kind, cls, fisher_type, compiled=True)
    for got, expected in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for got, expected in zip(compiled_precond.layers, eager_precond.layers, strict=True):
        assert got.input_factor is not None, got.name
        torch.testing.assert_close(got.input_factor, expected.input_factor)
        torch.testing.assert_close(got.output_factor, expected.output_factor)
