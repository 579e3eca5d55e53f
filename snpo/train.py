"""Train a diffusion model with Diff-SNPO / Diffusion-DPO / Bounded DPO / Diffusion-NPO / SFT.

    deepspeed --num_gpus 8 snpo/train.py --config snpo/configs/sdxl_snpo.yaml [--key value ...]
    DS_ACCELERATOR=cpu deepspeed --master_port 29611 --num_gpus 2 snpo/train.py --config C.yaml
    python -m snpo.train --config C.yaml [--key value ...]      (one process, no launcher)
    snpo train --config C.yaml [--key value ...]

Options: docs/trainer.md (or ``--help``). Exit codes (one line on stderr says why):

    0  done
    1  an unexpected error (a bug: the traceback is in output_dir/error-rank<R>.log)
    2  bad configuration, data or cache
    3  non-finite loss or gradient norm, or too many fp16 overflow skips (nothing saved)
    4  refused: resume impossible (options, base model, corrupt or untrusted checkpoint),
       output_dir holds another run or is in use by another process
    5  the model could not be loaded
    6  an I/O error (disk full, permissions) — the last complete checkpoint is intact
    7  torch.distributed / DeepSpeed failed, a collective timed out (the line names the ranks
       that stopped answering), or another process of the run failed
    8  preempted: a stop signal (SIGTERM, SIGINT, SIGUSR1) or the launcher's exit; a checkpoint
       was written after the current step, and the same command resumes exactly
"""

from __future__ import annotations

import os
import sys

# Run as a file by the deepspeed launcher (`deepspeed snpo/train.py`): make `snpo` importable.
if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from snpo.config import ConfigError, load_config, options_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print(options_table())
        return 0
    try:
        cfg = load_config(None, argv)
    except ConfigError as err:
        print(f"snpo train: configuration error: {err}", file=sys.stderr)
        return 2
    try:
        summary = _run(cfg)
    except BaseException as err:  # noqa: BLE001 - every failure leaves with a code and a line
        code, line = classify(err)
        if code == 1:
            line += f" (traceback: {_save_traceback(cfg, err)})"
        print(f"snpo train: {line}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # a process that failed alone must not wait in interpreter teardown (collectives,
            # loader workers): leave now, and the launcher stops the others
            os._exit(code)
        return code
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"snpo train: done at step {summary['step']}; export: {summary['export']}")
    return 0


def _run(cfg):
    from snpo.trainer import run

    return run(cfg)


EXIT_CODES = {
    "ConfigError": 2,
    "DataError": 2,
    "CacheError": 2,
    "NonFiniteError": 3,
    "ResumeError": 4,
    "CheckpointError": 4,
    "RunFolderError": 4,
    "UniversalError": 4,
    "FolderLocked": 4,
    "ModelLoadError": 5,
    "DistributedError": 7,
    "PeerFailed": 7,
    "DistBackendError": 7,
    "Preempted": 8,
}
PREFIX = {2: "", 3: "stopped: ", 4: "refused: ", 5: "", 6: "I/O error: ", 7: "", 8: "preempted: "}


def classify(err: BaseException) -> tuple[int, str]:
    """(exit code, the one line to print) for an exception that ended the run."""
    if isinstance(err, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(err, SystemExit):
        code = err.code if isinstance(err.code, int) else 1
        return code, f"exited with {code}"
    first = (str(err).strip().splitlines() or [""])[0]
    for cls in type(err).__mro__:
        if cls.__name__ in EXIT_CODES:
            code = EXIT_CODES[cls.__name__]
            return code, f"{PREFIX.get(code, '')}{type(err).__name__}: {first}"
    if isinstance(err, OSError):
        return 6, f"I/O error: {err}"
    if isinstance(err, RuntimeError) and "file write failed" in first:  # torch.save on a full disk
        return 6, f"I/O error: {first}"
    return 1, f"unexpected {type(err).__name__}: {first}"


def _save_traceback(cfg, err: BaseException) -> str:
    import traceback

    rank = os.environ.get("RANK", "0")
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    try:
        path = os.path.join(cfg.output_dir, f"error-rank{rank}.log")
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(path, "w") as fh:
            fh.write(text)
        return path
    except OSError:
        print(text, file=sys.stderr)
        return "printed above"


if __name__ == "__main__":
    sys.exit(main())
