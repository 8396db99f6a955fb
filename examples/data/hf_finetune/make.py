"""Writes the data of examples/hf_finetune_cpu.nemo (deterministic; run from anywhere):

  chat/train-00000-of-00001.parquet, chat/test-00000-of-00001.parquet   a Hugging Face dataset folder
      (split-named parquet files, as `Dataset.to_parquet` / the Hub lay them out) with columns
      `question`, `answer`: the .nemo file maps them onto prompt_response's `prompt`, `response`
  prefs.jsonl   preference pairs {"prompt", "chosen", "rejected"}: the right sum against a wrong one
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
QA = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a in range(8) for b in range(8)]


def main() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (HERE / "chat").mkdir(exist_ok=True)
    rows = [{"question": q, "answer": r} for q, r in QA]
    pq.write_table(pa.Table.from_pylist(rows[:56]), HERE / "chat" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[56:]), HERE / "chat" / "test-00000-of-00001.parquet")
    prefs = [{"prompt": q, "chosen": r, "rejected": r.replace(" is ", " is not ")} for q, r in QA]
    (HERE / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prefs))


if __name__ == "__main__":
    main()
