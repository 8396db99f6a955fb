"""`--set` reaching one argument of a call, and whole calls merged with the file's (never reset)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nemoc.compiler.lower import compile_file, load_experiment
from nemoc.dsl.diagnostics import DiagnosticError

EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "llama3_70b_sft_dpo.nemo")
BASE = """
experiment t {
  cluster { gpu = H100  nodes = 1 }
  model llama3_8b { seq_length = 4096 }
  data web { path = "web.jsonl" }
  stage sft {
    data = [web]  steps = 10
    optimizer = adam(lr = 1e-4, betas = [0.8, 0.9], weight_decay = 0.0)
    schedule = cosine(warmup = 50, min_lr = 1e-5)
  }
}
"""


def _write(tmp_path, text: str):
    path = tmp_path / "t.nemo"
    path.write_text(textwrap.dedent(text))
    return str(path)


def spec_of(tmp_path, sets, text=BASE):
    return load_experiment(_write(tmp_path, text), tuple(sets))[0]


def diagnostics_of(tmp_path, sets, text=BASE):
    _, diags, _ = compile_file(_write(tmp_path, text), tuple(sets))
    return diags


def test_one_argument_keeps_the_others(tmp_path):
    spec = spec_of(tmp_path, ["stage.sft.optimizer.lr=2e-5", "stage.sft.schedule.warmup=7"])
    opt, sched = spec.stage("sft").optimizer, spec.stage("sft").schedule
    assert (opt.name, opt.lr, opt.betas, opt.weight_decay) == ("adam", 2e-5, (0.8, 0.9), 0.0)
    assert (sched.name, sched.warmup, sched.min_lr) == ("cosine", 7, 1e-5)
    assert spec.spans["stage.sft.optimizer.lr"].path == "<--set 1>"
    assert spec.spans["stage.sft.optimizer.weight_decay"].path.endswith("t.nemo")


def test_a_whole_call_of_the_same_function_merges(tmp_path):
    spec = spec_of(tmp_path, ["stage.sft.optimizer=adam(lr = 2e-5, eps = 1e-6)"])
    opt = spec.stage("sft").optimizer
    assert (opt.lr, opt.eps, opt.betas, opt.weight_decay) == (2e-5, 1e-6, (0.8, 0.9), 0.0)
    assert not diagnostics_of(tmp_path, ["stage.sft.optimizer=adam(lr = 2e-5)"])


def test_later_overrides_of_one_argument_win(tmp_path):
    spec = spec_of(tmp_path, ["stage.sft.optimizer.lr=1e-3", "stage.sft.optimizer=adam(lr = 2e-3)",
                              "stage.sft.optimizer.lr=3e-3"])
    assert spec.stage("sft").optimizer.lr == 3e-3 and spec.stage("sft").optimizer.weight_decay == 0.0


def test_another_function_replaces_the_call_and_says_so(tmp_path):
    sets = ["stage.sft.optimizer=sgd(lr = 0.1)"]
    spec = spec_of(tmp_path, sets)
    opt = spec.stage("sft").optimizer
    assert opt.name == "sgd" and opt.lr == 0.1 and opt.weight_decay == 0.1  # sgd's default, not the file's
    (warning,) = diagnostics_of(tmp_path, sets)
    assert warning.code == "W050" and not warning.is_error
    assert "`betas`, `weight_decay` are dropped" in warning.message and "`lr`" not in warning.message
    assert warning.notes[0].span.line == 8


def test_an_argument_of_a_call_the_file_does_not_write_starts_from_the_default_function(tmp_path):
    spec = spec_of(tmp_path, ["stage.sft.peft.rank=8", "cluster.scheduler.partition=\"batch\"",
                              "stage.sft.peft.alpha=16"])
    assert spec.stage("sft").peft.rank == 8 and spec.stage("sft").peft.alpha == 16
    assert spec.stage("sft").peft.dropout == 0.0
    assert spec.cluster.scheduler == "slurm" and spec.cluster.scheduler_options.partition == "batch"
    assert spec.cluster.scheduler_options.account is None  # not written: the schema's default
    plain = BASE.replace("    optimizer = adam(lr = 1e-4, betas = [0.8, 0.9], weight_decay = 0.0)\n", "")
    assert spec_of(tmp_path, ["stage.sft.optimizer.lr=5e-5"], plain).stage("sft").optimizer.name == "adam"


def test_a_call_inherited_from_a_template_is_merged_too(tmp_path):
    text = 'cluster big { gpu = H100  scheduler = slurm(partition = "batch", time = 1h) }\n' + \
        BASE.replace("cluster { gpu = H100  nodes = 1 }", "cluster big { nodes = 1 }")
    spec = spec_of(tmp_path, ["cluster.scheduler.time=2h"], text)
    options = spec.cluster.scheduler_options
    assert (options.partition, options.time) == ("batch", 7200)


@pytest.mark.parametrize("override, message, hint", [
    ("stage.sft.optimizer.lrr=2e-5", "`adam` (the `optimizer`) has no argument `lrr`",
     "did you mean `lr`? `adam` takes: `lr`, `betas`, `eps`, `weight_decay`, `grad_clip`"),
    ("stage.sft.peft.nope=1", "`lora` (the `peft`) has no argument `nope`",
     "`lora` takes: `rank`, `alpha`, `dropout`, `targets`, `rslora`"),
    ("parallel.tensor.x=1", "`tensor` in `parallel` is an integer, not a call or a block", None),
    ("stage.sft.optimizer.lr.x=1", "a call argument has no fields: `lr.x`", None),
])
def test_bad_argument_paths_name_the_argument(tmp_path, override, message, hint):
    with pytest.raises(DiagnosticError) as info:
        spec_of(tmp_path, [override])
    (diag,) = info.value.diagnostics
    assert diag.code == "E050" and diag.message == message and diag.span.path == "<--set 1>"
    if hint:
        assert diag.hint == hint


def test_the_argument_override_is_checked_like_the_file(tmp_path):
    with pytest.raises(DiagnosticError) as info:
        spec_of(tmp_path, ["stage.sft.optimizer.lr=3GiB"])
    (diag,) = info.value.diagnostics
    assert diag.code == "E031" and diag.span.path == "<--set 1>" and diag.span.col == 24  # the value, after `stage.sft.optimizer.lr=`


def test_cli_renders_the_argument_error_at_the_override():
    from nemoc.runtime.cli import cli

    result = CliRunner().invoke(cli, ["check", EXAMPLE,
                                      "--set", "stage.sft.optimizer.lrr=2e-5"])
    assert result.exit_code == 1
    assert "<--set 1>:1:21: error[E050]: `adam` (the `optimizer`) has no argument `lrr`" in result.output
    ok = CliRunner().invoke(cli, ["check", EXAMPLE, "--set", "stage.sft.optimizer.lr=2e-5"])
    assert ok.exit_code == 0, ok.output


_SEGMENTS = ["stage", "sft", "optimizer", "schedule", "peft", "template", "lr", "rank", "warmup", "user", "cluster",
             "scheduler", "partition", "time", "parallel", "tensor", "x", "checkpoint", "every"]
_VALUES = ["2e-5", "8", "adam(lr = 1)", "sgd", "none", "lora(rank = 4)", '"p"', "1h", "[1, 2]", "auto", "slurm()", "x(y = 1)"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.lists(st.sampled_from(_SEGMENTS), min_size=1, max_size=5), st.sampled_from(_VALUES)),
                max_size=4))
def test_any_override_of_calls_is_a_result_or_diagnostics(tmp_path, overrides):
    sets = tuple(".".join(path) + "=" + value for path, value in overrides)
    spec, diags, _ = compile_file(_write(tmp_path, BASE), sets)
    assert spec is not None or diags
    assert all(d.span is not None and d.code != "E000" for d in diags)  # every problem placed; no internal error
