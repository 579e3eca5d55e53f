"""``snpo cache``: precompute what a training run reads besides the policy, so that training can
run without the VAE, the text encoders or the reference model.

    snpo cache --config TRAIN.yaml --out CACHE [--key value ...] [--epochs E|auto]
               [--what latents,text,ref] [--shard_size 4096] [--batch_size 8]
               [--latent_dtype auto|fp16|bf16|fp32] [--latent_mode auto|variants|epochs]
               [--ref_inputs auto|cache|live] [--train_world W] [--rank R --world N]
               [--num_workers W] [--overwrite] [--quiet]
    snpo cache --verify CACHE [--repair]      hash every shard; name the bad ones
    snpo cache --merge CACHE                  fold rank journals into manifest.json
    snpo cache --info CACHE                   what the cache holds
    torchrun --nproc_per_node N -m snpo.cli cache --config ...
    deepspeed --num_gpus N --module snpo.cache.cli --config ...
        each rank builds contiguous runs of every phase's shards; CPU: gloo, CUDA: nccl

It reads the trainer's own TrainConfig (same YAML, same overrides), so it caches exactly what
that run needs. Three sections, each optional (--what):

text     the prompt embeddings of every distinct prompt (pooled ones too for SDXL-, SD3- and
         FLUX-class models; SD3: CLIP-L/G + T5 states) in the training dtype (lossless); the
         pair → prompt map; the null embedding (encoded empty prompt, or zeros for SDXL with
         force_zeros_for_empty_prompt). A run reading them loads no text encoder (no T5).
latents  the VAE posterior (mean and log-variance, shifted and scaled) of every image for
         the config's resolution and crop, stored in --latent_dtype (auto: fp16 for fp32 runs,
         else the training dtype, lossless). Center crop (random_crop: false): both flip
         variants of every image (x1 with random_flip: false), exact for any number of epochs;
         random_crop: true: the drawn crop+flip of every epoch (--latent_mode epochs).
         Pixel-space models (no VAE): the transformed image itself, as exact uint8.
ref      the reference errors e_ref of winner and loser of every (epoch, pair), 2 float32
         per pair per epoch, computed by snpo.step.reference_errors on the inputs the run
         will use: the cached latents/text (--ref_inputs cache, the default when they are
         cached) or live-encoded ones.

Concurrency: a build holds CACHE/.lock for its whole run (exclusively for one process or a
torch.distributed launch, shared plus CACHE/.lock-rankR-of-N for independent --rank R --world
N jobs); --merge and --verify --repair hold it exclusively. A second writer is refused at once
naming the holder's pid. Readers (training, --verify, --info) take no lock.

Exit codes: 0 done, 1 verification found problems, 2 bad configuration, data or cache.
See docs/cache.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch

from snpo.cache.builder import DEFAULT_BATCH_SIZE, DEFAULT_SHARD_SIZE, build_cache
from snpo.cache.locks import FolderLocked
from snpo.cache.reader import Cache
from snpo.cache.sections import SECTIONS, span
from snpo.cache.store import CacheError, journal_paths, merge_parts, merged_view, verify_cache

__all__ = ["describe", "main"]

_OPTS = {
    "--out": str,
    "--epochs": str,
    "--train_world": int,
    "--what": str,
    "--shard_size": int,
    "--batch_size": int,
    "--latent_dtype": str,
    "--latent_mode": str,
    "--ref_inputs": str,
    "--rank": int,
    "--world": int,
    "--num_workers": int,
    "--verify": str,
    "--merge": str,
    "--info": str,
}
_FLAGS = ("--overwrite", "--repair", "--quiet")


def _split_args(argv: list[str]) -> tuple[dict, list[str]]:
    """({option: value} of this command's own options, the rest: config path and overrides).
    ``--a-b`` is read as ``--a_b``; SystemExit names a missing or mistyped value."""
    mine: dict = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg.partition("=")
        key = key.replace("-", "_").replace("__", "--", 1) if key.startswith("--") else key
        if key in _FLAGS:
            mine[key[2:]] = True
        elif key in _OPTS:
            if not eq:
                if i + 1 >= len(argv):
                    raise SystemExit(f"snpo cache: {key} needs a value")
                value = argv[i + 1]
                i += 1
            try:
                mine[key[2:]] = _OPTS[key](value)
            except ValueError as err:
                raise SystemExit(
                    f"snpo cache: {key} expects {_OPTS[key].__name__}, got {value!r}"
                ) from err
        else:
            rest.append(arg)
        i += 1
    return mine, rest


def describe(root: str | Path) -> str:
    """A human-readable summary of the cache in ``root`` (snpo cache --info)."""
    root = Path(root)
    view = merged_view(root)
    lines = [f"cache {root}"]
    for name, sec in sorted(view["sections"].items()):
        size = sum(e["bytes"] for e in sec["shards"].values())
        lines.append(
            f"  {name}: {len(sec['shards'])} shard(s), {size / 2**20:.1f} MiB; layout "
            + json.dumps(sec["layout"], sort_keys=True)
        )
        if name in ("ref", "latents"):
            c = Cache(root, view, seed=0, verify="none")
            eps = c.epochs if name == "ref" else c.latent_epochs
            if eps is not None:
                lines.append(f"    complete: {span(eps)}")
        lines.append("    fingerprint " + json.dumps(sec["fingerprint"], sort_keys=True))
    if journal_paths(root):
        lines.append(f"  {len(journal_paths(root))} unmerged rank journal(s): snpo cache --merge")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``snpo cache`` with ``argv`` (default ``sys.argv[1:]``; see the module docstring).
    Returns the exit code: 0 done, 1 verification found problems, 2 bad configuration, data
    or cache."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    from snpo.config import ConfigError, load_config
    from snpo.data import DataError

    try:
        opts, rest = _split_args(argv)
    except SystemExit as err:
        print(err, file=sys.stderr)
        return 2
    try:
        if "verify" in opts:
            problems, notes = verify_cache(opts["verify"], repair=opts.get("repair", False))
            for note in notes:
                print(f"note: {note}")
            for p in problems:
                print(f"corrupt: {p}", file=sys.stderr)
            if opts.get("repair") and problems:
                print("the bad shards were dropped; rerun snpo cache to rebuild them")
            if not problems:
                print(f"snpo cache: {opts['verify']}: every shard matches its SHA-256")
            return 1 if problems else 0
        if "merge" in opts:
            view = merge_parts(opts["merge"])
            n = sum(len(s["shards"]) for s in view["sections"].values())
            print(f"snpo cache: merged; the manifest lists {n} shard(s)")
            return 0
        if "info" in opts:
            print(describe(opts["info"]))
            return 0
        cfg = load_config(None, rest)
        out = opts.get("out") or getattr(cfg, "cache_dir", None)
        if not out:
            raise ConfigError("--out: the cache folder is required")
        what = [w.strip() for w in opts.get("what", ",".join(SECTIONS)).split(",") if w.strip()]
        bad = [w for w in what if w not in SECTIONS]
        if bad:
            raise ConfigError(f"--what: unknown section(s) {bad}; choose from {SECTIONS}")
        ep = opts.get("epochs", "auto")
        epochs = None if ep == "auto" else int(ep)
        started = _init_distributed(cfg, opts)
        try:
            summary = build_cache(
                cfg,
                out,
                what=what,
                epochs=epochs,
                train_world=opts.get("train_world", 1),
                shard_size=opts.get("shard_size", DEFAULT_SHARD_SIZE),
                batch_size=opts.get("batch_size", DEFAULT_BATCH_SIZE),
                latent_dtype=opts.get("latent_dtype", "auto"),
                latent_mode=opts.get("latent_mode", "auto"),
                ref_inputs=opts.get("ref_inputs", "auto"),
                rank=opts.get("rank"),
                world=opts.get("world"),
                overwrite=opts.get("overwrite", False),
                num_workers=opts.get("num_workers"),
                verbose=not opts.get("quiet", False),
            )
        finally:
            if started:
                torch.distributed.destroy_process_group()
        if summary and int(os.environ.get("RANK", "0")) == 0 and not opts.get("quiet"):
            print(json.dumps(summary))
        return 0
    except (ConfigError, DataError, CacheError, FolderLocked, ValueError) as err:
        print(f"snpo cache: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


def _init_distributed(cfg, opts: dict) -> bool:
    """Join the process group of a torchrun / deepspeed launch (gloo on the CPU)."""
    import datetime

    if "rank" in opts or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=6))
    return True


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
