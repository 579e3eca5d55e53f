"""The cache build at scale (issue 18): many parquet files read sequentially, the work shared
over ranks (and nodes: global rank and world size only), and resumability across a change of
the number of ranks.

- shares: contiguous runs that cover every unit exactly once, for any world; a process group
  cuts what is missing into even runs; DataLoader workers get contiguous runs of a shard;
- reads (every ``read_row_group`` counted per rank and worker): each rank reads its files front
  to back, one row group at a time, and a row group is read by one rank only, except one that
  straddles the boundary between two ranks' runs (at most world − 1 of them);
- a 2-rank torch.distributed build SIGKILLed mid-way (one rank right after a journal entry,
  the other between a shard's rename and its entry), resumed on 1 and on 3 ranks, ends
  byte-identical to an uninterrupted build; nothing journaled is built again, nothing is
  missing, and the 3 ranks share the missing units evenly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from snpo.cache import build_cache, journal_paths, load_manifest, merge_parts
from snpo.cache import shard_builder as SB
from snpo.cache.ranks import rank_units, todo_share, worker_batch_order
from snpo.data import sources as S
from snpo.data import synthetic_pairs, write_pickapic_parquet
from tests.cache.conftest import assert_same_cache, make_cfg
from tests.trainer.conftest import WORDS, child_env, free_port

REPO = Path(__file__).resolve().parents[2]
FILES, ROWS, ROW_GROUP = 4, 20, 5  # 80 pairs in 16 row groups of 5
SHARD = 8  # 10 latents shards, whose bounds are not row-group bounds (8 vs 5)
OPTS = dict(epochs=2, shard_size=SHARD, batch_size=4, latent_dtype="fp32", verbose=False)


# ------------------------------------------------------------------------------------------
# fixtures
@pytest.fixture(scope="module")
def many_files(tmp_path_factory) -> list[Path]:
    """4 Pick-a-Pic-layout files of 20 rows in row groups of 5 (no ties: pair = row)."""
    root = tmp_path_factory.mktemp("many")
    return [
        write_pickapic_parquet(
            root / f"train-{j:05d}.parquet", synthetic_pairs(ROWS, WORDS, seed=10 + j), ROW_GROUP
        )
        for j in range(FILES)
    ]


@pytest.fixture(scope="module")
def scale(tmp_path_factory, tiny_sd, many_files) -> tuple:
    """(config over the 4 files, the YAML it was loaded from)."""
    root = tmp_path_factory.mktemp("scalecfg")
    cfg = make_cfg(root, tiny_sd, [str(f) for f in many_files])
    return cfg, root / "train.yaml"


@pytest.fixture(scope="module")
def scale_cfg(scale):
    return scale[0]


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): the same bits
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, scale_cfg):
    """An uninterrupted one-process build of every section (one intra-op thread)."""
    out = tmp_path_factory.mktemp("scaleref") / "cache"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_cache(scale_cfg, out, rank=0, world=1, num_workers=0, **OPTS)
    finally:
        torch.set_num_threads(before)
    return out


class ReadLog:
    """Every row-group read of the parquet sources: (tag, pid, file name, row group)."""

    def __init__(self, monkeypatch, path: Path):
        self.tag = None
        self.path = path  # a file: DataLoader workers append to it too
        saved = S.open_parquet
        log = self

        class Logged:
            def __init__(self, p, **kw):
                self._pf, self._name = saved(p, **kw), Path(p).name

            def read_row_group(self, i, **kw):  # in this process or a DataLoader worker
                with open(log.path, "a") as f:
                    f.write(json.dumps([log.tag, os.getpid(), self._name, i]) + "\n")
                return self._pf.read_row_group(i, **kw)

            def __getattr__(self, name):
                return getattr(self._pf, name)

        monkeypatch.setattr(S, "open_parquet", Logged)

    def take(self) -> list[tuple]:
        if not self.path.is_file():
            return []
        rows = [tuple(json.loads(x)) for x in self.path.read_text().splitlines()]
        self.path.unlink()
        return rows


def _row_groups_of_shards(shards) -> set[tuple[str, int]]:
    """The (file, row group) of every pair of latents shards ``shards`` (pair = row here)."""
    out = set()
    for k in shards:
        for i in range(k * SHARD, min(FILES * ROWS, (k + 1) * SHARD)):
            out.add((f"train-{i // ROWS:05d}.parquet", (i % ROWS) // ROW_GROUP))
    return out


def _assert_front_to_back(reads: list[tuple]) -> None:
    """Per reader (pid): row groups in file order, each at most once."""
    by_pid: dict[int, list] = {}
    for _, pid, name, g in reads:
        by_pid.setdefault(pid, []).append((name, g))
    for pid, seq in by_pid.items():
        assert seq == sorted(set(seq)), f"reader {pid} read {seq}"


# ------------------------------------------------------------------------------------------
# shares
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("n", [0, 1, 5, 10, 23])
def test_rank_units_are_contiguous_even_and_cover_everything_once(n, world):
    runs = [rank_units(n, r, world) for r in range(world)]
    assert [i for run in runs for i in run] == list(range(n))  # in order, each once
    assert max(map(len, runs)) - min(map(len, runs)) <= 1
    assert [len(r) for r in runs] == sorted((len(r) for r in runs), reverse=True)
    with pytest.raises(ValueError):
        rank_units(n, world, world)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_todo_share_spreads_exactly_the_missing_units(world):
    g = torch.Generator().manual_seed(world)
    for trial in range(20):
        n = int(torch.randint(0, 30, (1,), generator=g))
        done = (torch.rand(n, generator=g) < trial / 20).tolist()
        shares = [todo_share(done, r, world) for r in range(world)]
        flat = [i for s in shares for i in s]
        assert flat == [i for i, d in enumerate(done) if not d]  # missing ones, once, in order
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize("workers", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("batches", [0, 1, 2, 5, 7, 12])
def test_worker_batch_order_gives_each_worker_a_contiguous_run(batches, workers):
    order = worker_batch_order(batches, workers)
    assert sorted(order) == list(range(batches))
    w = max(1, workers)
    got = [[order[j] for j in range(len(order)) if j % w == k] for k in range(w)]  # DataLoader
    flat = [b for run in got for b in run]
    assert flat == list(range(batches)), got  # worker k: run k, front to back
    assert max(map(len, got)) - min(map(len, got)) <= 1


def test_a_dataloader_hands_each_worker_its_run():
    """The assumption of worker_batch_order, checked on torch's DataLoader itself."""

    class WorkerId(torch.utils.data.Dataset):
        def __len__(self):
            return 100

        def __getitem__(self, i):
            return i, torch.utils.data.get_worker_info().id

    batches = [[a, a + 1] for a in range(0, 14, 2)]  # 7 batches
    order = worker_batch_order(len(batches), 2)
    loader = torch.utils.data.DataLoader(
        WorkerId(), batch_sampler=[batches[j] for j in order], num_workers=2, collate_fn=list
    )
    seen: dict[int, list[int]] = {}
    for items in loader:
        for i, w in items:
            seen.setdefault(w, []).append(i)
    assert seen == {0: [0, 1, 2, 3, 4, 5, 6, 7], 1: [8, 9, 10, 11, 12, 13]}


# ------------------------------------------------------------------------------------------
# sequential reads
@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_reads_its_files_front_to_back(
    world, scale_cfg, reference, tmp_path, monkeypatch, one_thread
):
    """Independent ranks (the share of a SLURM array, or of nodes: global rank and world only)
    build latents and text; every row-group read is counted. Each rank reads a contiguous run
    of row groups in file order, each once; a row group is read by a second rank only where
    it straddles two ranks' runs. The merged cache equals the one-process build's sections."""
    log = ReadLog(monkeypatch, tmp_path / "reads.jsonl")
    out = tmp_path / "c"
    reads = {}
    for rank in range(world):
        log.tag = rank
        build_cache(
            scale_cfg, out, what=("latents", "text"), rank=rank, world=world, num_workers=0,
            **OPTS,
        )  # fmt: skip
        reads[rank] = log.take()
    merge_parts(out)
    build_cache(scale_cfg, out, what=("ref",), rank=0, world=1, num_workers=0, **OPTS)
    assert_same_cache(out, reference)

    n_shards = FILES * ROWS // SHARD
    owners: dict[tuple, set[int]] = {}
    for rank, rs in reads.items():
        _assert_front_to_back(rs)
        got = [(name, g) for _, _, name, g in rs]
        want = _row_groups_of_shards(rank_units(n_shards, rank, world))
        assert set(got) == want  # exactly the row groups of its shards, nothing else
        for rg in got:
            owners.setdefault(rg, set()).add(rank)
    assert len(owners) == FILES * ROWS // ROW_GROUP  # every row group read
    shared = {rg: o for rg, o in owners.items() if len(o) > 1}
    assert len(shared) <= world - 1
    for rg, o in shared.items():  # only at a boundary between neighbouring ranks' runs
        a, b = sorted(o)
        assert b == a + 1
        first_b = rank_units(n_shards, b, world).start * SHARD
        assert rg == (f"train-{first_b // ROWS:05d}.parquet", (first_b % ROWS) // ROW_GROUP)
    # the old share (rank r: shards k ≡ r mod world) would make every straddling row group a
    # shared one: 9 shard bounds inside row groups here
    straddling = sum((k * SHARD) % ROW_GROUP != 0 for k in range(1, n_shards))
    assert straddling > world - 1


def test_workers_read_contiguous_runs_of_a_shard(scale_cfg, tmp_path, monkeypatch, one_thread):
    """Two DataLoader workers per shard: with shards of two row groups (10 pairs, batches of
    one pair), each row group is read once, by one worker, in file order (batches dealt out
    in turn would make both workers read both row groups of every shard); the bytes equal a
    build without workers."""
    log = ReadLog(monkeypatch, tmp_path / "reads.jsonl")
    opts = dict(OPTS, shard_size=2 * ROW_GROUP, batch_size=1)
    log.tag = 0
    build_cache(scale_cfg, tmp_path / "w2", what=("latents",), num_workers=2, **opts)
    reads = log.take()
    _assert_front_to_back(reads)
    got = [(name, g) for _, _, name, g in reads]
    assert sorted(got) == sorted(set(got)) and len(got) == FILES * ROWS // ROW_GROUP
    assert len({pid for _, pid, _, _ in reads}) >= 2  # the workers did the reading
    build_cache(scale_cfg, tmp_path / "w0", what=("latents",), num_workers=0, **opts)
    assert_same_cache(tmp_path / "w2", tmp_path / "w0")


# ------------------------------------------------------------------------------------------
# resume across a change of the number of ranks
_DRIVER = r'''
"""One rank of a torch.distributed cache build (a test driver): logs each shard it writes and
each row group it reads, and SIGKILLs itself at a chosen point."""
import datetime, json, os, signal, sys
sys.path.insert(0, {repo!r})
import torch.distributed as dist
from snpo.cache import build_cache
from snpo.cache import shard_builder as SB
from snpo.config import load_config
from snpo.data import sources as S

rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
config, out, logdir, kill = sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7]
opts = json.loads(sys.argv[8])
logf = os.path.join(logdir, f"rank{{rank}}-of-{{world}}.jsonl")


def note(*row):
    with open(logf, "a") as f:
        f.write(json.dumps(row) + "\n")


saved = S.open_parquet


class Logged:
    def __init__(self, p, **kw):
        self._pf, self._name = saved(p, **kw), os.path.basename(p)

    def read_row_group(self, i, **kw):
        note("read", os.getpid(), self._name, i)
        return self._pf.read_row_group(i, **kw)

    def __getattr__(self, name):
        return getattr(self._pf, name)


S.open_parquet = Logged
mode, _, n = kill.partition(":")  # "none", "after:N" (journaled N), "before:N" (N-th unlisted)
n = int(n or 0)
record = SB.ShardBuilder.record


def recording(self, section, rel, entry):
    note("built", section, rel)
    if mode == "before" and self.built + 1 == n:
        os.kill(os.getpid(), signal.SIGKILL)  # the shard file is there, its entry is not
    record(self, section, rel, entry)
    if mode == "after" and self.built == n:
        os.kill(os.getpid(), signal.SIGKILL)  # right after the journal entry


SB.ShardBuilder.record = recording
dist.init_process_group(
    "gloo", init_method=f"tcp://127.0.0.1:{{port}}", rank=rank, world_size=world,
    timeout=datetime.timedelta(seconds=120),
)
build_cache(load_config(config), out, num_workers=0, **opts)
dist.barrier()
dist.destroy_process_group()
'''


def _launch(tmp_path: Path, cfg_path: Path, out: Path, logdir: Path, kills: list[str]):
    """One process per entry of ``kills``, as one gloo group; → their return codes."""
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER.format(repo=str(REPO)))
    logdir.mkdir(parents=True, exist_ok=True)
    port, world = free_port(), len(kills)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(r),
                str(world),
                str(port),
                str(cfg_path),
                str(out),
                str(logdir),
                kills[r],
                json.dumps(OPTS),
            ],
            cwd=REPO,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for r in range(world)
    ]
    codes, logs = [], []
    for p in procs:
        o, _ = p.communicate(timeout=240)
        codes.append(p.returncode)
        logs.append(o)
    return codes, logs


def _log(logdir: Path, rank: int, world: int) -> list[list]:
    f = logdir / f"rank{rank}-of-{world}.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.is_file() else []


def _journaled(out: Path) -> set[str]:
    rels = set()
    for p in journal_paths(out):
        for sec in json.loads(p.read_text())["sections"].values():
            rels.update(sec["shards"])
    return rels


@pytest.mark.slow
def test_killed_two_rank_build_resumes_on_one_and_on_three_ranks(
    scale, scale_cfg, reference, tmp_path, monkeypatch, one_thread
):
    cfg_path = scale[1]
    sections = load_manifest(reference)["sections"]
    every = {rel for name in ("text", "latents", "ref") for rel in sections[name]["shards"]}
    assert len(sections["latents"]["shards"]) == 10 and len(sections["ref"]["shards"]) == 20
    n_text = len(sections["text"]["shards"])
    t0, t1 = len(rank_units(n_text, 0, 2)), len(rank_units(n_text, 1, 2))  # text units of each

    # 1. two ranks, both SIGKILLed in the latents phase: rank 0 right after its 2nd latents
    #    entry, rank 1 between the rename and the entry of its 3rd latents shard
    out = tmp_path / "killed"
    codes, logs = _launch(
        tmp_path, cfg_path, out, tmp_path / "log2", [f"after:{t0 + 2}", f"before:{t1 + 3}"]
    )
    assert codes == [-9, -9], "\n".join(x[-2000:] for x in logs)
    assert load_manifest(out) is None and len(journal_paths(out)) == 2  # nothing merged yet
    journaled = _journaled(out)
    built2 = {r[2] for k in (0, 1) for r in _log(tmp_path / "log2", k, 2) if r[0] == "built"}
    assert len(journaled) == t0 + t1 + 4 and len(built2 - journaled) == 1
    assert sum(rel.startswith("latents/") for rel in journaled) == 4  # killed mid-phase
    unlisted = (built2 - journaled).pop()
    assert (out / unlisted).is_file()  # written, never journaled: must be rebuilt
    shutil.copytree(out, tmp_path / "killed3")

    # 2. resumed on one process (merges the journals, builds exactly the rest)
    built1: list[str] = []
    record = SB.ShardBuilder.record

    def recording(self, section, rel, entry):
        built1.append(rel)
        record(self, section, rel, entry)

    monkeypatch.setattr(SB.ShardBuilder, "record", recording)
    s = build_cache(scale_cfg, out, rank=0, world=1, num_workers=0, **OPTS)
    assert sorted(built1) == sorted(every - journaled) and len(set(built1)) == len(built1)
    assert unlisted in built1 and s["skipped"] == len(journaled)
    assert_same_cache(out, reference)

    # 3. the same killed folder resumed on three ranks (one gloo group)
    out3 = tmp_path / "killed3"
    codes, logs = _launch(tmp_path, cfg_path, out3, tmp_path / "log3", ["none"] * 3)
    assert codes == [0, 0, 0], "\n".join(x[-2000:] for x in logs)
    assert_same_cache(out3, reference)
    rows = {r: _log(tmp_path / "log3", r, 3) for r in range(3)}
    built = {r: [x[1:] for x in rows[r] if x[0] == "built"] for r in range(3)}
    flat = [rel for r in range(3) for _, rel in built[r]]
    assert sorted(flat) == sorted(every - journaled)  # no unit twice, none missing
    for section in ("latents", "ref"):
        counts = [sum(sec == section for sec, _ in built[r]) for r in range(3)]
        assert max(counts) - min(counts) <= 1, (section, counts)  # the missing ones, evenly
        order = sorted(rel for r in range(3) for sec, rel in built[r] if sec == section)
        mine = [[rel for sec, rel in built[r] if sec == section] for r in range(3)]
        assert [x for m in mine for x in m] == order  # contiguous runs, in order
    for r in range(3):
        _assert_front_to_back([x for x in rows[r] if x[0] == "read"])
