"""`nemoc run` of a tiny experiment whose eval stage runs at pipeline parallelism 2 on the CPU box's two
processes (pretrain -> eval): the plan keeps the stage's pipeline = 2 (one chunk per rank, no virtual
stages), the orchestrator launches the layout's two processes, and the eval reports finite validation,
response and preference numbers and its generations, written once (rank 0)."""

from __future__ import annotations

import json
import math

import pytest

from cli_chain import REPO, nemoc_run

EXPERIMENT = """
cluster cpu_box {
  gpu = CPU
  gpus_per_node = 2
}

experiment eval_pipeline {
  cluster cpu_box {}

  model tiny_llama {
    layers = 2
    hidden = 64
    heads = 4
    query_groups = 2
    ffn_hidden = 128
    vocab = 4096
    seq_length = 64
    activation = swiglu
    norm = rmsnorm
    position = rope
  }

  parallel {
    tensor = 1
    pipeline = 1
    data = auto
    micro_batch = auto
  }

  precision = fp32

  data corpus {
    path = "DATA/quickstart/corpus.jsonl"
    format = jsonl
    text_field = "text"
    vocab_size = 4096
  }

  data chat {
    path = "DATA/pipeline/sft.jsonl"
    format = chat
  }

  data prefs {
    path = "DATA/pipeline/prefs.jsonl"
    format = preference
  }

  stage pretrain {
    data = [corpus]
    steps = 4
    global_batch = 4
    optimizer = adam(lr = 1e-3)
  }

  stage eval after pretrain {
    data = [corpus, chat, prefs]
    prompts = ["What is 3 plus 2?", "Once upon a time"]
    max_new_tokens = 6
    parallel {
      pipeline = 2
      micro_batch = 2
    }
  }
}
"""


@pytest.mark.slow
def test_eval_runs_at_pp2_end_to_end(tmp_path):
    workdir, plan = nemoc_run(tmp_path, EXPERIMENT.replace("DATA", str(REPO / "examples" / "data")),
                              "eval_pipeline.nemo")
    ev = plan.stage("eval")
    assert (ev.layout.pp, ev.layout.dp, ev.layout.vp) == (2, 1, None)
    assert ev.execution.pipeline is not None  # the split the runtime builds: one layer per stage
    out = workdir / "tasks" / "eval_eval"
    done = json.loads((out / "DONE.json").read_text())
    results = json.loads((out / "results.json").read_text())
    assert done["steps"] == 0 and done["datasets"] == results["datasets"]
    corpus, chat, prefs = (results["datasets"][n] for n in ("corpus", "chat", "prefs"))
    for entry in (corpus, chat):
        assert entry["tokens"] > 0 and math.isfinite(entry["loss"]) and entry["perplexity"] == \
            pytest.approx(math.exp(entry["loss"]), rel=1e-6)
    assert 0.0 <= prefs["likelihood_accuracy"] <= 1.0 and math.isfinite(prefs["likelihood_margin"])
    assert [g["prompt"] for g in results["generations"]] == ["What is 3 plus 2?", "Once upon a time"]
    assert all(0 < g["tokens"] <= 6 for g in results["generations"])
