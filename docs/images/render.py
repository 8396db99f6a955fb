"""Regenerate the report screenshots in docs/images/ (needs Debian's chromium).

    .venv/bin/python docs/images/render.py [QUICKSTART_RUN_DIR]

Renders `nemoc plan --html` of examples/llama3_8b_pretrain.nemo and examples/gpt3_175b_a100.nemo (an
interleaved schedule) and, given a finished `nemoc run examples/quickstart.nemo` directory, its
`nemoc report`; saves chosen charts as small palette PNGs.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from nemoc.runtime.browser import render

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
NEMOC = str(Path(sys.executable).parent / "nemoc")
WIDTH = 900  # px of the saved images


def save(png: bytes, name: str) -> None:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image = image.resize((WIDTH, round(image.height * WIDTH / image.width)), Image.LANCZOS)
    image.quantize(colors=64).save(HERE / name, optimize=True)
    print(f"{name}: {(HERE / name).stat().st_size // 1024} KiB")


def main(argv: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        plans = {"llama3_8b": ("memory-0", "steptime-0", "cost"), "gpt3_175b": ("memory-0", "schedule-0")}
        for example, charts in plans.items():
            out = Path(tmp) / f"{example}.html"
            source = next((REPO / "examples").glob(f"{example}*.nemo"))
            subprocess.run([NEMOC, "plan", str(source), "--html", str(out)], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            shots = render(out).charts
            for chart in charts:
                save(shots[chart], f"plan_{example}_{chart.split('-')[0]}.png")
        if argv:
            out = Path(tmp) / "run.html"
            subprocess.run([NEMOC, "report", argv[0], "-o", str(out)], check=True, stdout=subprocess.DEVNULL)
            shots = render(out).charts
            for chart in ("curves-0", "predicted-0"):
                save(shots[chart], f"report_quickstart_{chart.split('-')[0]}.png")


if __name__ == "__main__":
    main(sys.argv[1:])
