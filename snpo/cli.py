"""The ``snpo`` command: one subcommand per tool, each the ``main(argv)`` of its module.

snpo train   --config C.yaml [--key value ...]   (same as `deepspeed snpo/train.py`)
snpo cache   precompute latents, text embeddings and reference errors
snpo sample  images from a trained model (CFG; Diffusion-NPO negative model)
snpo merge   Diffusion-NPO weight merging
snpo eval    implicit accuracy and reward scores
snpo plot    training curves (loss, accuracy per branch, logp proxy, grad norm) of runs
snpo world   the small synthetic preference world
snpo demo    the embedded default demo
snpo estimate  per-GPU memory of a config for each ZeRO stage and offload
snpo data    data tools: ``stats PATHS`` (rows, ties, usable pairs, image sizes), ``synth DIR``

Under the deepspeed launcher (``deepspeed --module snpo.cli cache ...``) a leading
``--local_rank=N`` is skipped.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": "snpo.train",
    "cache": "snpo.cache.cli",
    "sample": "snpo.tools.sample",
    "merge": "snpo.tools.merge",
    "eval": "snpo.tools.evaluate",
    "plot": "snpo.tools.plot",
    "world": "snpo.world.__main__",
    "demo": "snpo.world.demo",
    "estimate": "snpo.tools.estimate",
    "data": "snpo.data.__main__",
}


def _drop_local_rank(argv: list[str]) -> list[str]:
    """Without a leading ``--local_rank=N`` / ``--local_rank N``: the deepspeed launcher puts it
    before the subcommand (``deepspeed --module snpo.cli cache ...``); LOCAL_RANK is in the
    environment anyway."""
    if argv and argv[0].startswith("--local_rank="):
        return argv[1:]
    if argv and argv[0] == "--local_rank":
        return argv[2:]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = _drop_local_rank(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"snpo: unknown command {name!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name])
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
