"""Regression bounds on the calibration against published runs (bench/calibrate.py).

The bounds are what the model reaches today (docs/calibration.md); a change that makes the cost
or memory model worse on the published measurements fails here.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def calibrate():
    spec = importlib.util.spec_from_file_location("nemoc_bench_calibrate", ROOT / "bench" / "calibrate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture(scope="module")
def planned(calibrate):
    """Every usable row written as `.nemo` and planned as `nemoc plan` plans it (the only path)."""
    rows = calibrate.load_rows()
    return rows, calibrate.planned(rows)


@pytest.fixture(scope="module")
def results(planned):
    rows, out = planned
    return rows, [r for r in out if "error" in r]


def test_rows_are_sourced(calibrate) -> None:
    for row in calibrate.load_rows():
        assert row["source"] and row["source_ref"] and row["tokens_per_sec_per_gpu"] > 0


def test_throughput_error_bounds(results) -> None:
    """Through the language (docs/calibration.md): 83 pretraining rows, median 2.5 %, max 27.1 % (C21,
    unreliable); with the 18 fine-tuning rows, 101 planned rows (none refused), median 3.2 %, max 27.1 %."""
    _, used = results
    pre = [abs(r["error"]) for r in used if r["task"] == "pretrain"]
    assert len(pre) >= 83
    # 3.4 % -> 2.7 %: tile quantisation over the token rows (TE userbuffer chunks, per-expert rows) and
    # the refit of `EfficiencyParams` (docs/calibration.md, issue 17 "calibration misses by physical terms");
    # 2.7 % -> 2.5 % with the host-issue revision's refit; 2.6 % with the MoE revision's busiest-rank load
    # 2.6 % -> 3.4 % with Transformer Engine's fused cross entropy priced on every `kernels = te` stage (what
    # `nemoc run` now runs, as Megatron-Bridge's performance recipes): the rows cannot yet state the loss their
    # release ran (NeMo 24.07's GPT-3 / Llama 2 YAMLs and Megatron-LM r0.8.0: unfused; its Llama 3 / Nemotron
    # YAMLs and NeMo 2.x: Megatron-Core's native fused kernel), which needs a language field (docs/calibration.md,
    # "Issue 17, fused cross entropy"); 3.4 % -> 3.0 % once each row states its release's loss
    # (`cross_entropy_fusion`, calibrate.row_cross_entropy): native on NeMo 24.07's Llama 3 / Nemotron rows and
    # NeMo 25.02 / 25.04's, te on NeMo 25.07's, none on the rest
    assert statistics.median(pre) <= 0.030
    # C21 (unreliable: an unpublished configuration) +25.1 % -> +27.2 % (+27.9 %: CP revision; +29.1 %: TE's
    # fused cross entropy, which NeMo 25.07 ran: it stays)
    assert max(pre) <= 0.292
    assert sum(e <= 0.15 for e in pre) >= 78
    errors = [abs(r["error"]) for r in used]
    assert len(errors) >= 101  # the three Llama 2 70B SFT rows plan now (the launcher's recipe stated)
    # 3.2 % -> 3.8 %: TE's fused cross entropy (above); 3.3 % with each release's loss stated; 3.30 -> 3.16 % with
    # packed samples' whole attention tiles (the fine-tuning rows' median 5.0 -> 3.3 %: docs/calibration.md,
    # "Issue 17, sixth revision"); 3.07 % with their keys per tile counted in the whole sequence's unit
    assert statistics.median(errors) <= 0.032
    assert max(errors) <= 0.292
    assert sum(e <= 0.15 for e in errors) >= 96


def test_reliable_rows_error_bounds(calibrate, results) -> None:
    _, used = results
    errors = [abs(r["error"]) for r in used if calibrate.reliable(r)]
    assert len(errors) >= 91  # A14 / A15 and their repeats (x3) join: their recipe is stated now
    # 3.3 % -> 2.9 % (the target: 3 %); 2.6 % with the host-issue refit alone, 2.9 % with the MoE terms;
    # 2.93 -> 2.97 % with the CP ring counted from TE's code (its corrections are 16-bit: half the bytes
    # charged before; docs/calibration.md "Issue 17, CP revision")
    # 2.97 % -> 3.69 % with TE's fused cross entropy priced on rows that ran another loss (above): above the
    # issue's 3 % target until the rows can state it; 3.18 % with each row's release loss stated (native on NeMo
    # 24.07's Llama 3 / Nemotron rows and NeMo 25.02 / 25.04's, te on 25.07's, none on the rest): still above 2.97 % because
    # Megatron-Core's native fused loss (22 + 10 B per logit) is cheaper than the unfused one the rows were
    # priced with before (38 + 14), which moves the over-predicted Nemotron 8B / 22B rows up (+6.6 -> +8.9 %)
    # 3.18 % -> 2.96 % (the 3 % target) with the flash kernel's whole 128 x 128 tiles over packed
    # ~200-token samples (2 query tiles, 3 blocks each: the 7B / 13B / 70B SFT and LoRA rows 1-3 points slower,
    # A15 / A17 / A18 / A31 inside the median; no pretraining row moves: docs/calibration.md "Issue 17, sixth
    # revision"); 2.91 % with the keys per tile in the whole sequence's unit. It rests on the assumed ~200-token
    # SQuAD sample: 2.55 / 2.91 / 3.18 / 3.18 % at 160 / 200 / 240 / 256 tokens (the same section)
    assert statistics.median(errors) <= 0.030
    # Mixtral 8x22B at 64K on 256 B200 (C08): +16.1 % -> +22.8 % since its EP group sits in one node
    # (Megatron-Core's expert rank grid, ETP 1: NVLink, not two nodes over InfiniBand), which removed
    # 0.41 s of all-to-all that hid part of its miss; every other reliable row within 15 %
    # (docs/calibration.md, "MoE revision"); +22.8 % -> +24.5 % with TE's CP ring bytes (0.08 s less
    # cp_comm: the miss is not in the ring, "CP revision")
    assert max(errors) <= 0.25
    assert sum(e <= 0.15 for e in errors) >= 90
    # 82 -> 76 with TE's fused cross entropy priced on rows that ran Megatron-Core's native fused or unfused loss:
    # NeMo 24.07's Nemotron 8B / 22B (256K vocabulary) move +5-6 points, A49 / A52 / C05 +1-2.5 (above);
    # 76 -> 79 with each release's loss stated (Nemotron 8B A26 / A44 stay above 10 %: +10.5 %);
    # 79 -> 82 with the input embedding's DDP bucket exposed (reduced last, gathered first, 1F1B: Nemotron's
    # 256K-vocabulary embedding is 13-25 default buckets): A26 / A44 +10.5 -> +9.4 %, C05 +10.6 -> +9.0 %
    # (docs/calibration.md "Issue 17, this session's revision")
    assert sum(e <= 0.10 for e in errors) >= 82


def test_nemotron_340b_runs_its_published_bf16_optimizer_state_without_recompute(calibrate, planned) -> None:
    """NeMo 24.07's Nemotron-4 340B config keeps Adam's state in bf16 (the launcher's `optim.dtype: bf16`);
    stated as `optimizer_state_dtype = bf16`, the published layout fits without recompute, as the
    launcher config runs it, and the three rows are within 2.5 % (with fp32 state full recompute, -20 %)."""
    rows, out = planned
    got = {r["id"]: r for r in out}
    for rid in ("A10", "A28", "A46"):
        assert got[rid]["recompute"] == "none" and got[rid]["layout_kept"], got[rid]
        assert abs(got[rid]["error"]) <= 0.025, got[rid]  # A28 -2.2 % since the token-row tile term
    text = calibrate.row_nemo(calibrate.row_case(next(x for x in rows if x["id"] == "A10")), 128)
    assert "optimizer_state_dtype = bf16" in text
    other = calibrate.row_nemo(calibrate.row_case(next(x for x in rows if x["id"] == "C06")), 128)
    assert "optimizer_state_dtype" not in other  # NeMo 2.0 (25.x) recipes keep fp32 state


def test_each_nemo_release_runs_its_fp8_recipe(calibrate) -> None:
    """The FP8 recipe of each NeMo release's performance runs (`row_fp8`): 24.07 delayed scaling, 25.02
    delayed scaling with FP8 parameters (NeMo 2.2's `bf16_with_fp8_mixed`), 25.04 / 25.07 current
    scaling, as those pages state; the row's `.nemo` file says so."""
    rows = {r["id"]: r for r in calibrate.load_rows()}
    assert calibrate.row_fp8(rows["A10"]) == ("delayed", False)
    assert calibrate.row_fp8(rows["A15"]) == ("delayed", True)  # the launcher's fine-tuning examples
    assert calibrate.row_fp8(rows["C06"]) == ("delayed", True)
    assert calibrate.row_fp8(rows["C15"]) == ("tensorwise", False)
    text = calibrate.row_nemo(calibrate.row_case(rows["C06"]), 128)
    assert "fp8_recipe = delayed" in text and "fp8_param_gather = true" in text
    assert "fp8_recipe = tensorwise" in calibrate.row_nemo(calibrate.row_case(rows["C15"]), 128)


def test_each_row_states_its_release_loss(calibrate, planned) -> None:
    """The loss each source's release ran (`row_cross_entropy`, cited per source in bench/calibrate.py): NeMo
    24.07's launcher sets Megatron-Core's (native) fused loss for Llama 3 and Nemotron 4B-22B only; NeMo 25.02 /
    25.04's GPTConfig turns the native fused loss on, NeMo 25.07's performance scripts TE's; Megatron-LM's README
    runs and the 2021-22 papers ran the unfused one. Each row's plan records what it states."""
    rows = calibrate.load_rows()
    by_id = {r["id"]: r for r in rows}
    losses = {}
    for r in rows:
        key = (r["source"][0], r.get("container"), r["model"], (r["task"] or "pretrain").lower())
        losses.setdefault(key, set()).add(calibrate.row_cross_entropy(r))
    assert all(len(v) == 1 for v in losses.values())  # a release's model and task, never a row
    assert calibrate.row_cross_entropy(by_id["A08"]) == "native"  # Nemotron-8B, 24.07
    assert calibrate.row_cross_entropy(by_id["A11"]) == "native"  # Llama 3 8B, 24.07
    assert calibrate.row_cross_entropy(by_id["A01"]) == "none"  # GPT-3, 24.07: not in its YAML
    assert all(calibrate.row_cross_entropy(r) == ("te" if r["container"] == "NeMo 25.07" else "native")
               for r in rows if r["source"][0] == "C")
    assert all(calibrate.row_cross_entropy(r) == "none" for r in rows if r["source"][0] in "EFG")
    assert "cross_entropy_fusion = native" in calibrate.row_nemo(calibrate.row_case(by_id["C15"]), 128)
    for r in planned[1]:
        if "error" in r:
            assert r["problem"].cross_entropy == calibrate.row_cross_entropy(by_id[r["id"]])


def test_fine_tuning_rows_plan_from_a_checkpoint_with_prompt_response_data(calibrate, planned) -> None:
    """NeMo 24.07's SFT and LoRA rows are written as fine-tuning experiments (`init = hf(DIR)` with a
    stand-in config.json of the row's architecture, which `nemoc check` compares with the model block,
    and prompt/response data) and plan with the published layout. NeMo packed SQuAD (~200-token
    samples) into 4096-token sequences with THD attention; the rows state it (`pack = true`,
    `sample_tokens = 200`), so the plan costs each token's attention within its sample: the reliable
    rows are within 10 % (they were 8-17 % low with the whole sequence costed)."""
    rows, out = planned
    ft = [r for r in out if r.get("task") == "sft"]
    assert len(ft) == 18
    used = [r for r in ft if "error" in r]
    assert len(used) == 18 and all(r["layout_kept"] for r in used)
    # within 10 % (Llama 2 7B SFT / LoRA, TP 1, +8 to +9.5 % since the refit's FP8 efficiency: calibration.md;
    # +4.5 to +7.4 % with the packed samples' whole attention tiles, the 13B SFT rows A32 / A50 -8.2 -> -9.7 %,
    # -9.8 % with the keys per tile in the whole sequence's unit)
    # (A49 / A52 +10.6 / +10.5 % with TE's fused cross entropy priced; back to +9.7 % once the rows state NeMo
    # 24.07's Llama 2 loss, Megatron-Core's unfused one: docs/calibration.md "Issue 17, fused cross entropy")
    assert all(abs(r["error"]) <= 0.10 for r in used)
    assert all(not r["unstated"] for r in used)
    assert {r["peft"] for r in used} == {True, False}
    text = calibrate.row_nemo(calibrate.row_case(next(x for x in rows if x["id"] == "A16")), 8, "ckpt_a16")
    assert 'init = hf("ckpt_a16")' in text and "format = prompt_response" in text and "peft = lora" in text
    assert "pack = true" in text and "sample_tokens = 200" in text


def test_every_nemo_2407_pretraining_layout_plans_as_published(planned) -> None:
    """NeMo 24.07's H100 pretraining rows (A01-A12, repeated in later tables as A19-A30, A37-A48),
    among them the nine the planner used to refuse (Llama 3 8B, GPT-3 20B, Nemotron-4 340B), plan
    with their published layout once the recipe's bf16 gradient reduction and TP overlap are stated."""
    _, out = planned
    rows = {r["id"]: r for r in out}
    for block in (0, 18, 36):
        for k in range(1, 13):
            r = rows[f"A{block + k:02d}"]
            assert "rejected" not in r, r
            assert r["layout_kept"], r


def test_nemo_2407_fine_tuning_rows_state_the_launcher_recipe(calibrate, planned) -> None:
    """NeMo 24.07's fine-tuning rows ran NeMo-Framework-Launcher's `peft=llama/sft` stage with the tag's
    per-run examples (`examples/peft/llama/h100/*.sh`): VP 10 / 20 for the 13B / 70B SFT runs, FP8
    parameters, and bf16 Adam state (`conf/peft/llama/sft.yaml`, `optim.dtype: bf16`). Stated, Llama 2
    70B SFT on 16 H100 (TP4 PP4 VP20, DP 1; A15/A33/A51), refused before with E130 (fp32 Adam state
    unsharded at DP 1), plans as published, and nothing is refused."""
    rows, out = planned
    assert not [r for r in out if "rejected" in r]
    got = {r["id"]: r for r in out}
    for rid in ("A15", "A33", "A51"):
        assert got[rid]["layout_kept"] and got[rid]["recompute"] == "none", got[rid]
        assert abs(got[rid]["error"]) <= 0.07, got[rid]
    text = calibrate.row_nemo(calibrate.row_case(next(x for x in rows if x["id"] == "A15")), 16, "ckpt_a15")
    assert "virtual_pipeline = 20" in text and "optimizer_state_dtype = bf16" in text
    assert "fp8_param_gather = true" in text and "fp8_recipe = delayed" in text
    lora = calibrate.row_nemo(calibrate.row_case(next(x for x in rows if x["id"] == "A16")), 8, "ckpt_a16")
    assert "fp8_param_gather = true" in lora


def test_unreliable_rows_are_few_and_explained(calibrate) -> None:
    assert len(calibrate.UNRELIABLE) <= 4 and all(len(why) > 40 for why in calibrate.UNRELIABLE.values())


def test_no_systematic_bias(results) -> None:
    """Signed errors straddle zero: the model neither always over- nor under-predicts."""
    _, used = results
    signed = [r["error"] for r in used]
    assert abs(statistics.median(signed)) <= 0.03


def test_memory_against_korthikanti_figure_1(calibrate, results) -> None:
    rows, _ = results
    mem = calibrate.memory_errors(rows)
    assert len(mem) == 12
    acts = [abs(r["error"]) for r in mem if "activations" in r["label"]]
    states = [abs(r["error"]) for r in mem if "states" in r["label"]]
    assert max(acts) <= 0.01
    # the figure's states are 18 B x 12 l h^2 / (t p): transformer layers at our bytes per parameter
    assert max(states) <= 0.005


def test_memory_against_bare_megatron_on_h200(calibrate) -> None:
    """Stored single-H200 measurements of bare Megatron-Core (bench/results/megatron_h200.json):
    weights + fp32 grads + Adam states within 1 %, the forward-backward peak within 6 %."""
    rows = calibrate.megatron_errors()
    assert len(rows) >= 10
    for r in rows:
        if "unfused" not in r["name"]:
            assert abs(r["static_error"]) <= 0.01, r
        assert abs(r["peak_error"]) <= 0.06, r


def test_step_time_against_bare_megatron_on_h200(calibrate) -> None:
    """The local-spec path (kernels="local": unfused norms, RoPE, SwiGLU, torch softmax, foreach
    Adam) against the stored single-H200 step times, flash and unfused attention alike within 10 %
    (the unfused core's score chain counted kernel by kernel, backward's grad x output multiply and
    masked_fill clone included, streamed at SCORE_STREAM_FRACTION of the HBM peak:
    docs/calibration.md)."""
    rows = calibrate.megatron_errors()
    errors = [abs(r["step_error"]) for r in rows]
    assert len(rows) >= 10
    assert statistics.median(errors) <= 0.04
    assert max(errors) <= 0.10
    for r in rows:
        if "unfused" in r["name"]:  # the rows the score chain decides
            assert abs(r["step_error"]) <= 0.10, r


def test_the_largest_misses_print_their_step_time_terms(calibrate, results, capsys) -> None:
    """`--terms N`: each of the N largest misses with its chosen layout and every non-zero term of
    `Estimate.parts`, so a miss can be read term by term."""
    _, used = results
    calibrate.print_terms(used, 3)
    out = [line for line in capsys.readouterr().out.splitlines() if line.strip()][1:]  # after the heading
    worst = sorted(used, key=lambda r: -abs(r["error"]))[:3]
    assert [line.split()[0] for line in out[0::2]] == [r["id"] for r in worst]
    assert len(out) == 6 and all("compute" in line and "step_overhead" in line for line in out[1::2])


def test_named_rows_print_their_step_time_terms(calibrate, results, capsys) -> None:
    """`--rows C06,C08`: the named rows' terms, in the table's order, whatever their error."""
    _, used = results
    calibrate.print_terms(used, 0, ("C08", "C06"))
    out = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert "C08, C06" in out[0]
    assert [line.split()[0] for line in out[1::2]] == ["C06", "C08"]
    assert all("dp_comm_exposed" in line for line in out[2::2])


def test_nemo_2x_rows_state_the_release_cuda_graphs(calibrate, planned) -> None:
    """NeMo 25.04 / 25.07 captured each layer as a CUDA graph on GB200 where the release's recommended-config
    table says so (`NEMO_CUDA_GRAPHS`); 25.02 never did (B200, H100), nor the GB200 405B rows. The rows
    state it (`cuda_graph_impl = local`, Megatron-Core's `enable_cuda_graph`) and plan with it."""
    rows, out = planned
    by_id = {x["id"]: x for x in rows}
    text = {rid: calibrate.row_nemo(calibrate.row_case(by_id[rid]), by_id[rid]["num_gpus"])
            for rid in ("C11", "C18", "C15", "C02", "C05", "C13", "C09")}
    assert all("cuda_graph_impl = local" in text[rid] for rid in ("C11", "C18", "C15"))
    assert not any("cuda_graph_impl" in text[rid] for rid in ("C02", "C05", "C13", "C09"))
    got = {r["id"]: r for r in out}
    assert all("error" in got[rid] and got[rid]["layout_kept"] for rid in ("C11", "C18", "C15"))
