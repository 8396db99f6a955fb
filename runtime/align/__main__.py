"""`python -m nemoc.runtime.align TASK_JSON`: run one sft / lora / dpo / reward / ppo / eval / export stage.

Dispatches on the stage's kind in the compiled plan. Exit status: 0 success (DONE.json written),
1 failure (the error, and the traceback for unexpected errors, on stderr; one line, no traceback, for
a diverged loss "loss became NaN at step N ...", checkpoints that are all damaged, or a failed save
"checkpoint save failed at step N: ..."), 2 a bad task or bad input (bad data, incompatible
checkpoint: one `file:line`-style message, no traceback), 143 preempted (SIGTERM/SIGINT/SIGUSR1: the
stage finishes its step, saves its training state and resumes from it when re-run).
"""

from __future__ import annotations

import sys
import traceback

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_PREEMPTED = 0, 1, 2, 143


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m nemoc.runtime.align TASK_JSON", file=sys.stderr)
        return EXIT_BAD_INPUT
    from nemoc.runtime import checkpoint as ckpt
    from nemoc.runtime import faults
    from nemoc.runtime.align import common, runners, stage, trainer
    from nemoc.runtime.align.data import DataError

    try:
        task = stage.load_task(args[0])
        kind = task.stage.kind
        if kind not in runners.RUNNERS:
            raise common.AlignError(f"stage {task.stage.name}: kind {kind!r} is not an alignment stage "
                                    f"({', '.join(sorted(runners.RUNNERS))})")
        stage.init_process_group(task, single=kind in runners.SINGLE_PROCESS)
        runners.STOP.install()
        payload = runners.RUNNERS[kind](task)
        stage.write_done(task, payload)
        return EXIT_OK
    except trainer.Preempted as exc:
        print(f"nemoc {_what(args[0])}: {exc}; re-run to resume", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except (faults.LossDiverged, ckpt.CheckpointError, ckpt.CheckpointSaveError) as exc:
        print(f"nemoc {_what(args[0])}: error: {exc}", file=sys.stderr, flush=True)
        if not isinstance(exc, ckpt.CheckpointSaveError):  # a person must act; a requeue cannot help
            from nemoc.runtime import taskfile

            taskfile.mark_fatal(args[0], str(exc))
        return EXIT_FAILED
    except (common.AlignError, DataError) as exc:
        print(f"nemoc {_what(args[0])}: error: {exc}", file=sys.stderr, flush=True)
        from nemoc.runtime import taskfile

        taskfile.mark_fatal(args[0], str(exc))
        return EXIT_BAD_INPUT
    except Exception as exc:  # noqa: BLE001 - reported with its traceback, the run fails cleanly
        print(f"nemoc {_what(args[0])}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    finally:
        common.teardown_distributed()


def _what(path: str) -> str:
    return f"align ({path})"


if __name__ == "__main__":
    sys.exit(main())
