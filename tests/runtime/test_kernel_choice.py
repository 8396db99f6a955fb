"""The runtime honours the plan's `kernels`: margs.choose_kernels (plan setting x Transformer Engine
importable x CPU -> the layer spec and an optional warning), and train.kernel_setup, which the
training task calls once at start. No GPU needed."""

from __future__ import annotations

import pytest

from nemoc.runtime import megatron_args as margs


@pytest.mark.parametrize("planned, importable, cpu, use_te, warns", [
    ("te", True, False, True, False),  # a GPU with TE: what the plan assumed
    ("te", False, False, False, True),  # a GPU without TE: local spec, and say the plan is off
    ("te", False, True, False, True),  # a TE plan on the CPU adaptation
    ("te", True, True, False, True),  # (TE never runs on the CPU)
    ("local", True, False, False, False),  # local where TE is installed: a valid choice, honoured
    ("local", False, False, False, False),
    ("local", False, True, False, False),  # the CPU quickstart
])
def test_choose_kernels(planned, importable, cpu, use_te, warns):
    choice = margs.choose_kernels(planned=planned, te_importable=importable, cpu=cpu)
    assert choice.use_te is use_te and choice.kernels == ("te" if use_te else "local")
    assert (choice.warning is not None) is warns
    if warns:
        assert "kernels = te" in choice.warning and "--set kernels=local" in choice.warning
        assert "local spec" in choice.warning


def test_an_unknown_setting_is_an_unsupported_plan():
    with pytest.raises(margs.UnsupportedPlan, match="kernels"):
        margs.choose_kernels(planned="fast", te_importable=True, cpu=False)


def test_kernel_setup_follows_the_plan(monkeypatch):
    from nemoc.runtime import mcore_cpu, train

    monkeypatch.setattr(mcore_cpu, "is_applied", lambda: False)
    monkeypatch.setattr(mcore_cpu, "apply_no_te_fixes", lambda: None)
    monkeypatch.setattr(train.mdl, "have_transformer_engine", lambda: True)
    facts, warning = train.kernel_setup("te")
    assert facts == margs.MachineFacts(cpu=False, have_te=True) and warning is None
    facts, warning = train.kernel_setup("local")
    assert facts == margs.MachineFacts(cpu=False, have_te=False) and warning is None
    monkeypatch.setattr(train.mdl, "have_transformer_engine", lambda: False)
    facts, warning = train.kernel_setup("te")
    assert not facts.have_te and "transformer_engine does not import" in warning


def test_kernel_setup_on_this_cpu_machine_builds_the_local_spec():
    from nemoc.runtime import mcore_cpu, train

    if not mcore_cpu.is_applied():
        pytest.skip("CUDA is available: the CPU adaptation is not active")
    facts, warning = train.kernel_setup("local")
    assert facts == margs.MachineFacts(cpu=True, have_te=False) and warning is None
    facts, warning = train.kernel_setup("te")
    assert not facts.have_te and "CPU" in warning
