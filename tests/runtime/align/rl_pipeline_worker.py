"""Run under `torchrun --nproc-per-node 2`: two iterations of PPO or GRPO (`ppo|grpo`) at a two-process
layout (`pp2`: pipeline parallelism 2; `pp2vp2`: with 2 virtual stages per rank, 4 layers; `dp2`, `ep2`:
data parallelism 2 of a mixture-of-experts model, its experts split over the two ranks with `ep2`) from the
checkpoint `OUT/base` (align_helpers.rl_kind), its result to `OUT/KIND_LAYOUT.json` (compared with one
process, or with `dp2`, by test_align_rl_pipeline.py); `cp2`: context parallelism 2 on the SDPA core (every CP
rank must then hold the same rollout and metrics); `tp2sp`: tensor parallelism 2 with sequence parallelism
(the rollout decodes with it switched off: runtime/model.py `unsplit_sequence`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from align_helpers import rl_kind  # noqa: E402

from nemoc.runtime.align import common  # noqa: E402

LAYOUTS = {  # name -> (init_distributed kwargs, single_layout kwargs, rl_kind kwargs)
    "pp2": (dict(pp=2), dict(pp=2), {}),
    "pp2vp2": (dict(pp=2, vp=2), dict(pp=2, vp=2), dict(layers=4)),
    "dp2": (dict(), dict(dp=2), dict(experts=4)),
    "ep2": (dict(ep=2), dict(dp=2, ep=2), dict(experts=4)),
    "cp2": (dict(cp=2), dict(cp=2), dict(attention="flash")),
    "tp2sp": (dict(tp=2), dict(tp=2, sequence_parallel=True), {}),
}


def uneven_rollouts(layout) -> list:
    """Every rank's greedy rollout of prompts of its own lengths and budget (rank 0: 3-token prompts, 2 new
    tokens; rank 1: 5 to 7 tokens, 6 new), gathered on every rank: under expert parallelism the group decodes
    in step (rank 0 steps on after its rows stopped), and each row's tokens must be what it decodes alone."""
    from align_helpers import INSTR, LETTERS, SEP, rl_spec

    from nemoc.runtime import generation

    policy = common.build_gpt(rl_spec(experts=4), layout)
    common.load_model(policy, OUT / "base")
    rank = torch.distributed.get_rank()
    prompts = [[INSTR, a, SEP] + [LETTERS[-1]] * (2 * rank + i % 3 * rank) for i, a in enumerate(LETTERS[:4])]
    mine = generation.generate(policy, prompts, max_new_tokens=2 + 4 * rank, vocab=256, eod=-1, seq_length=16,
                               greedy=True).tokens
    every: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, mine)
    return every


def sequence_parallel_switches(layout) -> None:
    """Under `unsplit_sequence` every sequence-parallel switch of a model (configs, module attributes,
    ColumnParallelLinear's allreduce_dgrad, the parameters' tags) is off; after it, each is what it was. For
    a language model and for one with the scalar head of the reward model and critic (common.ScalarHead)."""
    from align_helpers import rl_spec

    from nemoc.runtime.model import unsplit_sequence

    def switches(model) -> dict:
        found = {}
        for name, m in model.named_modules():
            for attr in ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings",
                         "allreduce_dgrad"):
                if isinstance(getattr(m, attr, None), bool):
                    found[name, attr] = getattr(m, attr)
            if getattr(getattr(m, "config", None), "sequence_parallel", None) is not None:
                found[name, "config"] = m.config.sequence_parallel
            for pname, p in m.named_parameters(recurse=False):
                found[name, pname] = getattr(p, "sequence_parallel", None)
        return found

    for head in (False, True):
        model = common.build_gpt(rl_spec(), layout, scalar_head=head)
        before = switches(model)
        assert before[("", "config")] is True and before[("embedding.word_embeddings", "reduce_scatter_embeddings")]
        assert before[("output_layer", "sequence_parallel")] is True  # the vocabulary layer's or the head's gather
        with unsplit_sequence(model):
            inside = switches(model)
        assert before.keys() == inside.keys()
        on = {k: v for k, v in inside.items() if v is True and k[1] != "allreduce_dgrad"}
        assert not on, on
        assert all(v for k, v in inside.items() if k[1] == "allreduce_dgrad"), inside
        assert switches(model) == before


OUT = Path(".")


def main(out: Path, kind: str, name: str) -> None:
    global OUT
    OUT = out
    torch.set_num_threads(1)
    init, layout, extra = LAYOUTS[name]
    common.init_distributed(**{"tp": 1, "seed": 0, **init})
    lay = common.single_layout(global_batch=4, micro_batch=2, **layout)
    result = rl_kind(common, kind, out / "base", lay, **extra)
    if lay.sequence_parallel:
        sequence_parallel_switches(lay)
    if extra.get("experts"):
        result["uneven"] = uneven_rollouts(lay)
    if torch.distributed.get_rank() == 0:
        (out / f"{kind}_{name}.json").write_text(json.dumps(result))
    if init.get("cp", 1) > 1:  # every CP rank holds the same rollout and the same metrics (wall times aside)
        mine = {"tokens": result["tokens"],
                "steps": [{k: v for k, v in s.items() if not k.endswith("_time_s")} for s in result["steps"]]}
        box = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(box, mine)
        assert all(r == box[0] for r in box), box
    common.teardown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "pp2")
