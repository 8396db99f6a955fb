"""The models an alignment stage only runs forward (references, reward models, eval's model) are built without
the stage layout's `defer_embedding_wgrad_compute`: Megatron-Core 0.16.1 hands a frozen output layer's
`linear_with_frozen_weight` the deferral's buffer, which it refuses. The policy keeps the plan's setting."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from nemoc.runtime.align import common, stage
from plan_factory import make_layout


def test_megatron_core_refuses_a_deferral_buffer_on_a_frozen_weight():
    """What a frozen output layer built with the deferral runs (ColumnParallelLinear.forward passes
    grad_output_buffer=self.grad_output_buffer, an empty list, whenever config.defer_embedding_wgrad_compute)."""
    from megatron.core.tensor_parallel.layers import linear_with_frozen_weight

    x, w = torch.ones(2, 3), torch.ones(4, 3)
    with pytest.raises(AssertionError, match="grad_output_buffer"):
        linear_with_frozen_weight(x, w, None, False, False, False, None, grad_output_buffer=[])
    assert linear_with_frozen_weight(x, w, None, False, False, False, None).shape == (2, 4)


def _task(layout):
    st = SimpleNamespace(layout=layout, execution=SimpleNamespace(precision="bf16", attention="flash"),
                         seq_length=64, kernels="te")
    return SimpleNamespace(stage=st, plan=SimpleNamespace(model=object()), vocab_size=128)


@pytest.mark.parametrize("scalar_head", [False, True])
def test_frozen_models_are_built_without_the_deferral(monkeypatch, scalar_head):
    built = []

    def build_gpt(model, layout, **kw):
        built.append((layout, kw["scalar_head"]))
        return torch.nn.Linear(3, 4)

    monkeypatch.setattr(common, "build_gpt", build_gpt)
    monkeypatch.setattr(stage.dist, "machine_facts", lambda kernels: None)
    layout = dataclasses.replace(make_layout(pp=2), defer_embedding_wgrad_compute=True, wgrad_deferral_limit=3)
    frozen = stage.build_frozen(_task(layout), checkpoint=None, scalar_head=scalar_head)
    policy = stage.build(_task(layout), checkpoint=None, scalar_head=scalar_head)
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    assert all(p.requires_grad for p in policy.parameters())
    assert built[0] == (dataclasses.replace(layout, defer_embedding_wgrad_compute=False, wgrad_deferral_limit=0),
                        scalar_head)
    assert built[1] == (layout, scalar_head)
