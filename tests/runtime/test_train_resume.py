"""Resume: exact continuation from a checkpoint, fallback past a truncated or corrupted (same size,
caught by its digest) one to bit-identical weights, a stop naming the file when every checkpoint is
damaged, and a new TP layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nemoc.runtime.faults import differing_tensors


def _checkpoints_from(baseline, dest, iterations, latest):
    src = baseline.out / "checkpoints"
    dest.mkdir(parents=True)
    for it in iterations:
        shutil.copytree(src / f"iter_{it:07d}", dest / f"iter_{it:07d}")
    (dest / "latest").write_text(f"iter_{latest:07d}\n")
    return dest


def test_resume_is_exact_and_skips_a_corrupt_latest(tmp_path, kit, train_data, reference_weights, baseline):
    """`latest` names iter 6 but one of its shards is truncated: the run warns, falls back to iter 3,
    and steps 4..6 reproduce the uninterrupted run bit for bit (model, Adam, scheduler, data position)."""
    ckdir = _checkpoints_from(baseline, tmp_path / "ck", (3, 6), latest=6)
    shard = next(p for p in sorted((ckdir / "iter_0000006").iterdir()) if p.suffix == ".distcp")
    with open(shard, "r+b") as handle:
        handle.truncate(max(shard.stat().st_size // 2, 1))
    plan = kit.make_plan(kit.stage_plan(lay=kit.layout(), every=3))
    result = kit.run_training(tmp_path / "run", plan, 1, data_prefix=train_data, checkpoint_dir=ckdir,
                              init_checkpoint=reference_weights)
    assert result.returncode == 0, result.explain()
    assert "skipping checkpoint" in result.stdout and "iter_0000006" in result.stdout, result.explain()
    resumed = [r for r in result.records if r.get("event") == "resumed"]
    assert resumed and resumed[0]["iteration"] == 3 and resumed[0]["optimizer_restored"]
    assert sorted(result.losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert result.losses[step] == baseline.losses[step], (step, result.losses, baseline.losses)
    assert (ckdir / "latest").read_text().strip() == "iter_0000006"
    assert result.done["checkpoint"] == str(ckdir / "iter_0000006")


def test_resume_under_a_new_tensor_parallel_layout(tmp_path, kit, train_data, baseline):
    """A TP=1 checkpoint resumed with TP=2: dist_checkpointing reshards model and optimizer state,
    and the loss curve continues where the TP=1 run went."""
    ckdir = _checkpoints_from(baseline, tmp_path / "ck", (3,), latest=3)
    lay = kit.layout(tp=2)
    plan = kit.make_plan(kit.stage_plan(lay=lay, every=3))
    result = kit.run_training(tmp_path / "run", plan, 2, data_prefix=train_data, checkpoint_dir=ckdir)
    assert result.returncode == 0, result.explain()
    resumed = [r for r in result.records if r.get("event") == "resumed"]
    assert resumed and resumed[0]["iteration"] == 3 and resumed[0]["optimizer_restored"]
    assert not resumed[0]["rng_restored"]  # RNG states are per-rank: not transferable across layouts
    for step in (4, 5, 6):
        assert result.losses[step] == pytest.approx(baseline.losses[step], rel=2e-5)


def _flip_bytes(path: Path) -> None:
    """Damage a file in place without changing its size (a bad disk, a bit rot)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, min(middle + 64, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _shard(checkpoint: Path) -> Path:
    return max((p for p in checkpoint.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)


def test_a_corrupted_shard_of_unchanged_size_is_skipped_and_the_result_is_bit_identical(
        tmp_path, kit, train_data, reference_weights, baseline):
    ckdir = _checkpoints_from(baseline, tmp_path / "ck", (3, 6), latest=6)
    shard = _shard(ckdir / "iter_0000006")
    size = shard.stat().st_size
    _flip_bytes(shard)
    assert shard.stat().st_size == size
    plan = kit.make_plan(kit.stage_plan(lay=kit.layout(), every=3))
    result = kit.run_training(tmp_path / "run", plan, 1, data_prefix=train_data, checkpoint_dir=ckdir,
                              init_checkpoint=reference_weights)
    assert result.returncode == 0, result.explain()
    assert f"skipping checkpoint {ckdir / 'iter_0000006'}" in result.stdout, result.explain()
    assert str(shard) in result.stdout and "corrupted" in result.stdout
    resumed = [r for r in result.records if r.get("event") == "resumed"]
    assert resumed and resumed[0]["iteration"] == 3
    assert not differing_tensors(result.done["checkpoint"], baseline.done["checkpoint"])


def test_when_every_checkpoint_is_damaged_the_run_stops_naming_the_file(tmp_path, kit, train_data,
                                                                          reference_weights, baseline):
    ckdir = _checkpoints_from(baseline, tmp_path / "ck", (3, 6), latest=6)
    _flip_bytes(_shard(ckdir / "iter_0000006"))
    truncated = _shard(ckdir / "iter_0000003")
    with open(truncated, "r+b") as handle:
        handle.truncate(truncated.stat().st_size // 2)
    plan = kit.make_plan(kit.stage_plan(lay=kit.layout(), every=3))
    result = kit.run_training(tmp_path / "run", plan, 1, data_prefix=train_data, checkpoint_dir=ckdir,
                              init_checkpoint=reference_weights)
    assert result.returncode == 1, result.explain()
    assert "error: no usable checkpoint under" in result.stderr and str(truncated) in result.stderr
    assert "Traceback" not in result.stderr, result.explain()
    assert result.done is None and not [r for r in result.records if "loss" in r]
