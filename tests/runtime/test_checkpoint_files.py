"""The checkpoint directory protocol: manifest verification, `latest`, candidates, keep-last-N."""

from __future__ import annotations

import json
import os

from nemoc.runtime import checkpoint as ckpt


def make_ckpt(root, iteration, *, files=None, manifest=True):
    path = root / ckpt.iteration_name(iteration)
    path.mkdir(parents=True)
    files = files or {"__0_0.distcp": b"x" * 10, "common.pt": b"y" * 3, "metadata.json": b"{}"}
    for name, data in files.items():
        (path / name).write_bytes(data)
    if manifest:
        sizes = {name: len(data) for name, data in files.items()}
        (path / ckpt.MANIFEST).write_text(json.dumps({"iteration": iteration, "files": sizes}))
    return path


def test_verify_detects_missing_manifest_missing_file_and_truncation(tmp_path):
    good = make_ckpt(tmp_path, 10)
    assert ckpt.verify(str(good)) is None
    assert "missing" in ckpt.verify(str(make_ckpt(tmp_path, 20, manifest=False)))
    truncated = make_ckpt(tmp_path, 30)
    (truncated / "__0_0.distcp").write_bytes(b"x")
    assert "manifest says 10" in ckpt.verify(str(truncated))
    gone = make_ckpt(tmp_path, 40)
    os.remove(gone / "common.pt")
    assert "common.pt is missing" in ckpt.verify(str(gone))


def test_latest_first_then_newest_and_tmp_dirs_are_never_candidates(tmp_path):
    for it in (5, 10, 15):
        make_ckpt(tmp_path, it)
    (tmp_path / "iter_0000020.tmp").mkdir()  # a save that never finished
    assert ckpt.read_latest(str(tmp_path)) is None
    assert [os.path.basename(p) for p in ckpt.resume_candidates(str(tmp_path))] == [
        "iter_0000015", "iter_0000010", "iter_0000005"]
    ckpt.write_text_atomic(str(tmp_path / "latest"), "iter_0000010\n")
    assert ckpt.read_latest(str(tmp_path)).endswith("iter_0000010")
    assert [os.path.basename(p) for p in ckpt.resume_candidates(str(tmp_path))] == [
        "iter_0000010", "iter_0000015", "iter_0000005"]
    (tmp_path / "latest").write_text("../../etc\n")  # garbage marker is ignored, not followed
    assert ckpt.read_latest(str(tmp_path)) is None
    (tmp_path / "latest").write_bytes(b"\xff\xfe\x00garbage")  # not even text: ignored too, no UnicodeDecodeError
    assert ckpt.read_latest(str(tmp_path)) is None
    assert os.path.basename(ckpt.resume_candidates(str(tmp_path))[0]) == "iter_0000015"
    (tmp_path / "latest").unlink()
    (tmp_path / "latest").mkdir()  # not a file
    assert ckpt.read_latest(str(tmp_path)) is None


def test_prune_keeps_newest_n_and_the_latest_and_removes_tmp(tmp_path):
    for it in (1, 2, 3, 4, 5):
        make_ckpt(tmp_path, it)
    (tmp_path / "iter_0000006.tmp").mkdir()
    ckpt.write_text_atomic(str(tmp_path / "latest"), "iter_0000001\n")  # e.g. after a fallback
    ckpt.prune(str(tmp_path), keep=2)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", "iter_0000004", "iter_0000005", "latest"]


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "latest"
    ckpt.write_text_atomic(str(target), "iter_0000001\n")
    ckpt.write_text_atomic(str(target), "iter_0000002\n")
    assert target.read_text() == "iter_0000002\n" and os.listdir(tmp_path) == ["latest"]


def test_digests_catch_a_corrupted_file_of_unchanged_size_and_older_manifests_still_verify(tmp_path):
    path = make_ckpt(tmp_path, 10, manifest=False)
    ckpt.write_manifest(str(path), iteration=10)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    assert manifest["digest"] == ckpt.DIGEST and set(manifest["files"]) == {"__0_0.distcp", "common.pt", "metadata.json"}
    assert ckpt.verify(str(path)) is None
    (path / "__0_0.distcp").write_bytes(b"x" * 4 + b"\x00" + b"x" * 5)  # one byte flipped, same size
    reason = ckpt.verify(str(path))
    assert reason is not None and str(path / "__0_0.distcp") in reason and "corrupted" in reason
    (path / "__0_0.distcp").write_bytes(b"x" * 7)
    assert "has 7 bytes, manifest says 10" in ckpt.verify(str(path))
    # each rank checks a share: together the shares cover every file
    assert [ckpt.verify(str(path), share=(i, 3)) is None for i in range(3)].count(False) == 1
    assert ckpt.verify(str(make_ckpt(tmp_path, 20))) is None  # {name: size} manifests of older versions
    (path / ckpt.MANIFEST).write_text('{"files": [1, 2]}')
    assert "unreadable" in ckpt.verify(str(path))


def test_a_failed_save_names_the_os_error_behind_the_wrappers():
    import errno

    full = OSError(errno.ENOSPC, "No space left on device", "/ck/iter_0000004.tmp/__0_1.distcp")
    try:
        try:
            raise full
        except OSError as inner:
            raise RuntimeError(f"Worker failure: {inner}") from inner
    except RuntimeError as wrapped:
        reason = ckpt.save_failure_reason(wrapped)
    assert reason == "No space left on device (/ck/iter_0000004.tmp/__0_1.distcp)"

    class CheckpointException(Exception):  # torch.distributed.checkpoint's: failures per rank
        def __init__(self, failures):
            super().__init__("failed")
            self.failures = failures

    assert ckpt.save_failure_reason(CheckpointException({1: (full, "tb")})).startswith("No space left")
    assert ckpt.save_failure_reason(ValueError("x")) == "ValueError: x"


def test_remove_partial_saves_removes_only_tmp_directories(tmp_path):
    make_ckpt(tmp_path, 5)
    (tmp_path / "iter_0000010.tmp").mkdir()
    (tmp_path / "iter_0000010.tmp" / "__0_0.distcp").write_bytes(b"")
    removed = ckpt.remove_partial_saves(str(tmp_path))
    assert [os.path.basename(p) for p in removed] == ["iter_0000010.tmp"]
    assert sorted(os.listdir(tmp_path)) == ["iter_0000005"]
