"""Multi-node launches on one machine (issue 18): two "nodes" on localhost, each its own
DeepSpeed launcher group, as ``deepspeed --hostfile`` starts them on a cluster.

- the cache build: what pdsh runs on every node, ``python -m deepspeed.launcher.launch
  --world_info=<hosts> --node_rank=K --master_addr --master_port``, twice (2 nodes × 2 local
  ranks): global ranks 0..3 (local ranks 0, 1 on each node) each build their own shards, none
  twice, and the cache is byte-identical to a one-process build;
- the trainer: ``deepspeed --hostfile H --no_ssh --node_rank K`` on each node (2 nodes × 1
  rank) logs exactly the losses of the same world size on one node, which runs through a
  hostfile too (``localhost slots=2``: the front end launches locally, no ssh or pdsh); the
  ranks' pairs are disjoint and follow the epoch's order.

Each rank's part is recorded by a wrapper script (rank, local rank and node from the
launcher's environment; the shards it writes, or its micro-batches' pairs)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import REPO, child_env, free_port, read_metrics, write_config

pytestmark = pytest.mark.slow
SEED = 3

_CACHE_WRAPPER = r'''
"""``snpo`` (the cache build under the deepspeed launcher), logging who built which shard."""
import json, os, sys
sys.path.insert(0, {repo!r})
from snpo.cache import shard_builder as SB

who = {{k: int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "CROSS_RANK")}}
record = SB.ShardBuilder.record


def recording(self, section, rel, entry):
    with open(os.path.join({log!r}, f"rank{{who['RANK']}}.jsonl"), "a") as f:
        f.write(json.dumps({{**who, "shard": rel}}) + "\n")
    return record(self, section, rel, entry)


SB.ShardBuilder.record = recording
with open(os.path.join({log!r}, f"rank{{who['RANK']}}.jsonl"), "a") as f:
    f.write(json.dumps({{**who, "shard": None}}) + "\n")
from snpo.cli import main
sys.exit(main())
'''

_TRAIN_WRAPPER = r'''
"""snpo/train.py logging each micro-batch's pairs with the launcher's rank variables."""
import json, os, sys
sys.path.insert(0, {repo!r})
from snpo.trainer import trainer as _t

who = {{k: int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "CROSS_RANK")}}
_micro_step = _t.Trainer.micro_step


def micro_step(self, batch, step):
    row = {{**who, "rank": self.dist.rank, "step": step, "epoch": int(batch.epoch),
           "pairs": [int(i) for i in batch.indices]}}
    with open(os.path.join({log!r}, f"rank{{self.dist.rank}}.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    return _micro_step(self, batch, step)


_t.Trainer.micro_step = micro_step
from snpo.train import main
sys.exit(main())
'''


def _wrapper(folder: Path, template: str) -> tuple[Path, Path]:
    log = folder / "ranks"
    log.mkdir(parents=True, exist_ok=True)
    script = folder / "wrapper.py"
    script.write_text(template.format(repo=str(REPO), log=str(log)))
    return script, log


def _rows(log: Path) -> list[dict]:
    return [
        json.loads(x)
        for f in sorted(log.glob("rank*.jsonl"))
        for x in f.read_text().splitlines()
        if x
    ]


def _run_nodes(cmds: list[list[str]], timeout: float = 300) -> None:
    """Start one launcher per "node" at once (each waits for the others at rendezvous)."""
    procs = [
        subprocess.Popen(
            c,
            cwd=REPO,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for c in cmds
    ]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-4000:]


def _deepspeed() -> str:
    exe = shutil.which("deepspeed", path=str(REPO / ".venv" / "bin")) or shutil.which("deepspeed")
    assert exe, "the deepspeed launcher is not installed"
    return exe


def _world_info(hosts: dict[str, list[int]]) -> str:
    """The launcher's ``--world_info``: urlsafe base64 of {host: [slot ids]} (runner.py)."""
    return base64.urlsafe_b64encode(json.dumps(hosts).encode()).decode()


def test_cache_build_on_two_nodes_of_two_ranks(tmp_path, tiny_sd, pickapic):
    from snpo.cache import build_cache, load_manifest
    from snpo.config import load_config
    from tests.cache.conftest import assert_same_cache

    cfg_path = write_config(tmp_path / "c.yaml", model=tiny_sd, train_data=pickapic)
    opts = ["--epochs", "2", "--shard_size", "4", "--batch_size", "4", "--num_workers", "0"]
    opts += ["--latent_dtype", "fp32", "--quiet"]
    script, log = _wrapper(tmp_path, _CACHE_WRAPPER)
    out = tmp_path / "cache"
    info, port = _world_info({"node0": [0, 1], "node1": [0, 1]}), free_port()
    _run_nodes(
        [
            [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={info}",
             f"--node_rank={k}", "--master_addr=127.0.0.1", f"--master_port={port}",
             str(script), "cache", "--config", str(cfg_path), "--out", str(out), *opts]
            for k in (0, 1)
        ]
    )  # fmt: skip

    rows = _rows(log)
    starts = sorted((r["RANK"], r["CROSS_RANK"], r["LOCAL_RANK"]) for r in rows if not r["shard"])
    assert starts == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]  # global = node · 2 + local
    assert all(r["WORLD_SIZE"] == 4 for r in rows)
    built = [(r["RANK"], r["shard"]) for r in rows if r["shard"]]
    shards = [s for _, s in built]
    assert len(shards) == len(set(shards))  # no shard built twice
    manifest = load_manifest(out)
    listed = {rel for sec in manifest["sections"].values() for rel in sec["shards"]}
    assert set(shards) == listed  # and none left out
    for rank in range(4):  # every rank built latents and reference errors of its own
        mine = [s for r, s in built if r == rank]
        assert any(s.startswith("latents/") for s in mine) and any(
            s.startswith("ref/") for s in mine
        )

    ref = tmp_path / "one"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched ranks (OMP_NUM_THREADS=1)
    try:
        build_cache(
            load_config(cfg_path), ref, epochs=2, shard_size=4, batch_size=4, num_workers=0,
            latent_dtype="fp32", verbose=False,
        )  # fmt: skip
    finally:
        torch.set_num_threads(before)
    assert_same_cache(out, ref)


def _train_config(tmp_path: Path, name: str, tiny_sd, data) -> Path:
    return write_config(
        tmp_path / f"{name}.yaml", model=tiny_sd, train_data=data, output_dir=tmp_path / name,
        objective="snpo", seed=SEED, zero_stage=2, train_batch_size_per_gpu=2,
        gradient_accumulation_steps=1, max_steps=2, checkpoint_every=0, dist_timeout_s=60.0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def one_node_run(tmp_path_factory, tiny_sd, pickapic_clean):
    """``deepspeed --hostfile H`` with ``localhost slots=2``: (metrics, pair log rows)."""
    root = tmp_path_factory.mktemp("onenode")
    hosts = root / "hostfile"
    hosts.write_text("localhost slots=2\n")
    cfg = _train_config(root, "run", tiny_sd, pickapic_clean)
    script, log = _wrapper(root, _TRAIN_WRAPPER)
    cmd = [_deepspeed(), "--hostfile", str(hosts), "--no_ssh_check", "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(script), "--config", str(cfg)]  # fmt: skip
    _run_nodes([cmd])
    return read_metrics(root / "run"), _rows(log)


def test_hostfile_with_localhost_slots_launches_locally(one_node_run):
    rows, pairs = one_node_run
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["pairs"] == 2 * 2 for r in rows)  # micro 2 × accumulation 1 × 2 ranks
    assert sorted({(p["RANK"], p["CROSS_RANK"], p["LOCAL_RANK"]) for p in pairs}) == [
        (0, 0, 0), (1, 0, 1)
    ]  # fmt: skip


def test_trainer_on_two_nodes_equals_one_node(tmp_path, tiny_sd, pickapic_clean, one_node_run):
    from snpo.data import PairOrder
    from snpo.draws import epoch_permutation

    hosts = tmp_path / "hostfile"
    hosts.write_text("node0 slots=1\nnode1 slots=1\n")  # any names: --no_ssh starts nothing
    cfg = _train_config(tmp_path, "run", tiny_sd, pickapic_clean)
    script, log = _wrapper(tmp_path, _TRAIN_WRAPPER)
    port = free_port()
    _run_nodes(
        [
            [_deepspeed(), "--hostfile", str(hosts), "--no_ssh", "--node_rank", str(k),
             "--num_nodes", "2", "--num_gpus", "1", "--master_addr", "127.0.0.1",
             "--master_port", str(port), str(script), "--config", str(cfg)]
            for k in (0, 1)
        ]
    )  # fmt: skip
    rows, pairs = read_metrics(tmp_path / "run"), _rows(log)
    assert sorted({(p["RANK"], p["CROSS_RANK"], p["LOCAL_RANK"]) for p in pairs}) == [
        (0, 0, 0), (1, 1, 0)
    ]  # fmt: skip
    for step in (1, 2):  # disjoint pairs on the two nodes
        a, b = ([i for p in pairs if p["step"] == step and p["RANK"] == r for i in p["pairs"]]
                for r in (0, 1))  # fmt: skip
        assert len(a) == len(b) == 2 and not set(a) & set(b)
    for r in (0, 1):  # each rank: its share of the global order (global rank, world 2)
        order = PairOrder(16, seed=SEED, rank=r, world=2, micro=2)
        got = [p["pairs"] for p in sorted(pairs, key=lambda p: p["step"]) if p["RANK"] == r]
        assert got == [[i for _, i in order.batch(g)] for g in (0, 1)]
    seen = {i for p in pairs for i in p["pairs"]}
    assert seen == set(epoch_permutation(SEED, 0, 16).tolist()[:8])  # the epoch's first 8

    one_rows, one_pairs = one_node_run
    key = ("step", "epoch", "pairs", "loss", "grad_norm")
    assert [{k: r[k] for k in key} for r in rows] == [{k: r[k] for k in key} for r in one_rows]
    strip = ("CROSS_RANK", "LOCAL_RANK")
    same = sorted(json.dumps({k: v for k, v in p.items() if k not in strip}) for p in pairs)
    assert same == sorted(
        json.dumps({k: v for k, v in p.items() if k not in strip}) for p in one_pairs
    )
