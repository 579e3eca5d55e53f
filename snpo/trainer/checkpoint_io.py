"""A run's DeepSpeed checkpoints: where to resume from, writing (sealed with checksums), verifying
before anything is unpickled, loading, and where the data order continues on another number of
processes.

Tags are ``step_<N>`` in ``output_dir/checkpoints``, written by ``engine.save_checkpoint`` on all
ranks with the trainer's client state. All randomness is counter-based (:mod:`snpo.draws`), so
step, weights, optimizer and LR-scheduler state are all a resume needs to continue bit-identically.

With ``ema_decay`` > 0 a tag also holds the fp32 EMA of the trained weights
(:mod:`snpo.trainer.ema`) as safetensors (no pickle), written atomically before the tag is sealed:
``snpo_ema.safetensors`` (ZeRO 0–2, by rank 0) or ``snpo_ema_rank<R>.safetensors`` (ZeRO-3, each
rank its partition; :func:`load_ema` concatenates them, so another number of ranks can resume).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

from snpo.config import ConfigError, TrainConfig
from snpo.distributed import DistInfo, all_gather_objects, barrier
from snpo.precision import dtype_of
from snpo.trainer.checkpoints import (
    LATEST_FILE,
    CheckpointError,
    choose_tag,
    complete_tags,
    digests,
    extra_files,
    inside,
    my_share,
    prune,
    read_checksums,
    seal,
    tag_files,
    tag_name,
    verify_files,
)
from snpo.trainer.errors import CheckpointWriteError, ResumeError

CHECKPOINT_DIR = "checkpoints"
EMA_FILE = "snpo_ema.safetensors"
EMA_RANK_FILE = "snpo_ema_rank{rank:05d}.safetensors"


def checkpoint_dir(cfg: TrainConfig) -> Path:
    """``output_dir/checkpoints``."""
    return Path(cfg.output_dir) / CHECKPOINT_DIR


def resume_target(cfg: TrainConfig) -> tuple[Path, str, str | None] | None:
    """(folder, tag, warning) to resume from per ``cfg.resume``, or None for a fresh start.

    auto: the newest complete tag in output_dir/checkpoints (``latest`` when it names one).
    A tag or folder: that checkpoint; outside output_dir only with ``trust_checkpoint``
    (checkpoints are pickles)."""
    if cfg.resume == "never":
        return None
    d = checkpoint_dir(cfg)
    if cfg.resume == "auto":
        tag, warning = choose_tag(d)
        return None if tag is None else (d, tag, warning)
    p = Path(cfg.resume)
    if p.is_dir() and ((p / LATEST_FILE).is_file() or not (p / "snpo-checksums.json").is_file()):
        folder, tag, warning = (p, *choose_tag(p))
        if tag is None:
            raise ConfigError(f"resume: {cfg.resume!r} holds no checkpoint")
    elif p.is_dir():
        folder, tag, warning = p.parent, p.name, None
    elif (d / cfg.resume).is_dir():
        folder, tag, warning = d, cfg.resume, None
    else:
        raise ConfigError(
            f"resume: no checkpoint {cfg.resume!r} (a folder or a tag in checkpoints/)"
        )
    if not inside(folder, Path(cfg.output_dir)) and not cfg.trust_checkpoint:
        raise CheckpointError(
            f"resume: {folder} is outside output_dir {cfg.output_dir}; DeepSpeed checkpoints are "
            "pickles that can run code when loaded, so snpo resumes only from its own folder: "
            "add --trust_checkpoint if you wrote it or trust its author"
        )
    return folder, tag, warning


def rebase_position(
    epoch: int, batch: int, *, micro: int, old_world: int, new_world: int, batches_per_epoch: int
) -> tuple[int, int, int]:
    """Where the data order of ``new_world`` processes continues a run that stopped before
    micro-batch ``batch`` of ``epoch`` on ``old_world`` → (global micro-step, its epoch, pairs
    skipped). The pairs of an epoch are consumed in permutation order, micro × world per
    global micro-batch, so batch × micro × old_world pairs are done; the new order starts at the
    first whole batch past them (none repeats; ``skipped`` < micro × new_world are left out
    when the count does not divide)."""
    consumed = batch * micro * old_world
    per_batch = micro * new_world
    new_batch = -(-consumed // per_batch)
    skipped = new_batch * per_batch - consumed
    if new_batch >= batches_per_epoch:
        epoch, new_batch, skipped = epoch + 1, 0, 0
    return epoch * batches_per_epoch + new_batch, epoch, skipped


def save_ema(tag_dir: Path, ema, dist: DistInfo) -> None:
    """Write ``ema`` (:class:`snpo.trainer.ema.EMA`) into ``tag_dir`` atomically (module
    docstring: one file by rank 0, or one partition file per rank under ZeRO-3)."""
    from safetensors.torch import save

    from snpo.atomic import atomic_write_bytes

    if ema.partitioned:
        name = EMA_RANK_FILE.format(rank=dist.rank)
    elif dist.is_main:
        name = EMA_FILE
    else:
        return
    meta = {
        "decay": repr(ema.decay),
        "start_step": str(ema.start_step),
        "world": str(dist.world),
        "partitioned": str(ema.partitioned),
    }
    data = save({k: v.contiguous() for k, v in ema.state().items()}, metadata=meta)
    atomic_write_bytes(Path(tag_dir) / name, data)


def load_ema(tag_dir: Path, ema) -> None:
    """Set ``ema`` from the EMA files of ``tag_dir`` (verified with the tag); ResumeError when
    they are missing or do not fit the trainable parameters."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from snpo.trainer.ema import merge_partitions

    tag_dir = Path(tag_dir)
    single = tag_dir / EMA_FILE
    ranks = sorted(tag_dir.glob("snpo_ema_rank*.safetensors"))
    if not single.is_file() and not ranks:
        raise ResumeError(
            f"checkpoint {tag_dir} holds no EMA ({EMA_FILE}) although ema_decay is "
            f"{ema.decay:g}; resume from a checkpoint written with the EMA, or start a new run"
        )
    try:
        if single.is_file():
            full = load_file(str(single))
        else:
            with safe_open(str(ranks[0]), "pt") as fh:
                saved_world = int((fh.metadata() or {}).get("world", len(ranks)))
            if len(ranks) != saved_world:
                raise ValueError(f"{len(ranks)} partition files of {saved_world} ranks")
            full = merge_partitions([load_file(str(f)) for f in ranks], ema.shapes())
        ema.load_full(full)
    except (ValueError, OSError) as err:
        raise ResumeError(f"checkpoint {tag_dir}: cannot load its EMA: {err}") from err


def trajectory_change(state: dict, cfg: TrainConfig) -> list[str]:
    """The trajectory options that differ between a checkpoint's client state and ``cfg``
    (["unknown"] when the fingerprints differ and the checkpoint records no options); [] when
    resumable.

    An option the checkpoint does not record (added to snpo after it was written, e.g. the
    flow-matching options) is unchanged when ``cfg`` leaves it at its default: the default is
    what the older code did."""
    if state.get("snpo_fingerprint") == cfg.fingerprint():
        return []
    old, new = state.get("snpo_trajectory", {}), cfg.trajectory_dict()
    if not old:
        return sorted(k for k in new if new[k] is not None) or ["unknown"]
    defaults = TrainConfig().trajectory_dict()
    old = {**{k: v for k, v in defaults.items() if k not in old}, **old}
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


class RunCheckpoints:
    """Writes, verifies and loads the checkpoints of one run (collective: every rank calls)."""

    def __init__(self, cfg: TrainConfig, dist: DistInfo, *, lora: bool) -> None:
        self.cfg, self.dist, self.lora = cfg, dist, lora
        self.folder = checkpoint_dir(cfg)
        self.saved_bytes = 0
        self._space_warned = False

    def last_tag(self) -> str:
        """The newest complete tag, or "none"."""
        tags = complete_tags(self.folder)
        return tags[-1] if tags else "none"

    def save(self, engine, step: int, state: dict, ema=None) -> None:
        """Every rank writes its DeepSpeed files (and its EMA file, :func:`save_ema`), every rank
        hashes its share of them, rank 0 writes the checksum file and then ``latest``
        (:mod:`snpo.trainer.checkpoints`). A write that fails (a full disk) removes the partial
        tag and raises :class:`CheckpointWriteError`; ``latest`` and the older tags are
        untouched."""
        cfg, dist, d = self.cfg, self.dist, self.folder
        tag = tag_name(step)
        if dist.is_main:
            if (d / tag).is_dir() and read_checksums(d / tag) is None:
                shutil.rmtree(d / tag, ignore_errors=True)  # a save of this step that died
            self._check_disk_space(engine)
        barrier()
        try:
            if cfg.debug_fail_at_step == step and dist.rank == cfg.debug_fail_rank:
                (d / tag).mkdir(parents=True, exist_ok=True)
                raise OSError(28, f"No space left on device (debug_fail_at_step {step})")
            engine.save_checkpoint(
                str(d),
                tag=tag,
                client_state=state,
                save_latest=False,
                exclude_frozen_parameters=self.lora,
            )
            if ema is not None:
                save_ema(d / tag, ema, dist)
        except (OSError, RuntimeError) as err:
            shutil.rmtree(d / tag, ignore_errors=True)
            free = shutil.disk_usage(d).free if d.is_dir() else 0
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointWriteError(
                f"cannot write checkpoint {tag} in {d}: {first}"
                f"; {free / 2**30:.2f} GiB free there, a checkpoint takes about "
                f"{self._checkpoint_bytes(engine) / 2**30:.2f} GiB; the partial tag was removed, "
                f"latest still names {self.last_tag()}"
            ) from err
        barrier()
        names = tag_files(d / tag)
        parts = all_gather_objects(digests(d / tag, my_share(names, dist.rank, dist.world)))
        if dist.is_main:
            files = {k: v for part in parts for k, v in part.items()}
            seal(d, tag, files)
            self.saved_bytes = sum(v["size"] for v in files.values())
            prune(d, cfg.keep_checkpoints, tag)
        barrier()

    def _checkpoint_bytes(self, engine) -> int:
        """The size of one checkpoint: measured after the first save, else estimated (weights
        in the training dtype + fp32 master copy and two AdamW moments of what trains, + the
        frozen weights unless LoRA excludes them)."""
        if self.saved_bytes:
            return self.saved_bytes
        params = list(engine.module.parameters())
        n_train = sum(
            p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params if p.requires_grad
        )
        n_frozen = sum(p.numel() for p in params if not p.requires_grad)
        elem = dtype_of(self.cfg.precision).itemsize
        return n_train * (elem + 12) + (0 if self.lora else n_frozen * elem)

    def _check_disk_space(self, engine) -> None:
        """Warn (once) when the disk cannot hold keep_checkpoints + 1 checkpoints: the newest
        is written before the oldest is pruned."""
        if self._space_warned:
            return
        d = self.folder
        d.mkdir(parents=True, exist_ok=True)
        keep = self.cfg.keep_checkpoints
        one = self._checkpoint_bytes(engine)
        need = one * ((keep + 1) if keep else 1)
        have = shutil.disk_usage(d).free + sum(
            f.stat().st_size for f in d.rglob("*") if f.is_file()
        ) * bool(keep)
        if have < need:
            self._space_warned = True
            warnings.warn(
                f"{d}: {have / 2**30:.2f} GiB available for checkpoints, but "
                f"{'keep_checkpoints + 1 = ' + str(keep + 1) if keep else 'one'} checkpoint(s) "
                f"of about {one / 2**30:.2f} GiB need "
                f"{need / 2**30:.2f} GiB: a save may fail (lower keep_checkpoints or free space)",
                stacklevel=3,
            )

    def verify(self, folder: Path, tag: str) -> None:
        """Check every file of ``folder/tag`` against its checksum file before DeepSpeed opens
        any (the hashing is spread over the ranks); CheckpointError names each bad file."""
        listed = read_checksums(folder / tag)
        if listed is None:
            raise CheckpointError(
                f"checkpoint {folder / tag} has no checksum file: it is incomplete or was not "
                "written by snpo; nothing from it is loaded"
            )
        names = sorted(listed)
        dist = self.dist
        bad = verify_files(folder / tag, listed, my_share(names, dist.rank, dist.world))
        if dist.is_main:
            bad += [
                f"{folder / tag / n}: not listed in the checksum file"
                for n in extra_files(folder / tag, listed)
            ]
        problems = [b for part in all_gather_objects(bad) for b in part]
        if problems:
            raise CheckpointError(
                f"checkpoint {folder / tag} is corrupt, nothing was loaded: "
                + "; ".join(problems[:4])
                + (f" (+{len(problems) - 4} more)" if len(problems) > 4 else "")
                + "; delete that tag folder to resume from the previous checkpoint"
            )

    def load(self, engine, folder: Path, tag: str) -> dict:
        """Load ``folder/tag`` (verify it first) into ``engine`` → its client state."""
        try:
            path, state = engine.load_checkpoint(
                str(folder),
                tag=tag,
                load_module_strict=not self.lora,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
        except Exception as err:  # noqa: BLE001 - DeepSpeed raises many kinds
            raise ResumeError(
                f"DeepSpeed could not load checkpoint {folder / tag}: {type(err).__name__}: "
                f"{err}".splitlines()[0]
            ) from err
        if path is None or state is None:
            raise ResumeError(f"could not load checkpoint {tag!r} from {folder}")
        return state
