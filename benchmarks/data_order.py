"""What the pair order costs on Pick-a-Pic-layout parquet, and what opening many shards costs.

    OMP_NUM_THREADS=1 python -m benchmarks.data_order [--files 3] [--rows 300] [--rounds 3]
        [--pairs 0 (one epoch)] [--startup-files 645] [--startup-rows 1487] [--out benchmarks/results]

Order (issue 18, item 2): a generated multi-file set in the published layout — the 19-column
schema of :mod:`snpo.data.schema`, row groups of 100 rows, ``jpg_0``/``jpg_1`` JPEGs of
``--image-kb`` KB each (Pick-a-Pic v2 averages ~336 KB a row) — read through
:meth:`snpo.data.sources.PickapicParquet.get` (row-group read + cell extraction, no JPEG
decode: that costs the same in every order) in micro-batches of 8, one process, for

- ``sequential``: pairs in file order (the floor: each row group read once);
- ``global``: :class:`snpo.data.PairOrder`'s global permutation (a one-row-group cache);
- ``windowed``: ``data_order: windowed``, K = ``--window`` row groups cached.

Each measurement runs in a fresh interpreter that first reads one untimed epoch of the same
contender (the memory a worker holds once it runs: K row groups), then times another epoch from
a fresh source (cold row-group cache; the files sit in the OS page cache after generation, so
this measures parquet reads at memory speed, not disk). Contenders are interleaved in rounds
(A B C, B C A, ...) after a warm-up round; wall and process CPU time (and its system part) are
recorded. ``--in-process`` runs everything in one process instead: faster, but then a
contender pays for the memory the previous one made the allocator give back.
Bytes read are counted exactly through :func:`snpo.data.sources.open_parquet`.

Start-up (item 3): ``--startup-files`` files of ``--startup-rows`` rows each in the real schema
with tiny image payloads; the time and bytes read of opening them all as one source.

Writes ``<device-slug>-data-order-<date>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from . import harness as H
from . import report as R

REPO = Path(__file__).resolve().parents[1]
MICRO = 8
CONTENDERS = ("sequential", "global", "windowed")


# ---------------------------------------------------------------------------------------------
# data
class CountingFile(io.RawIOBase):
    """A read-only file counting the bytes read through it into ``counter[0]``."""

    def __init__(self, path: str, counter: list[int]) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed with the wrapper
        self._counter = counter

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readinto(self, b) -> int:  # noqa: ANN001
        n = self._f.readinto(b)
        self._counter[0] += n or 0
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


@contextmanager
def counting_reads():
    """Within: every parquet file a source opens counts its bytes read into the yielded [n]."""
    import pyarrow.parquet as pq

    from snpo.data import sources as S

    counter = [0]
    saved = S.open_parquet
    S.open_parquet = lambda p, **kw: pq.ParquetFile(CountingFile(p, counter), **kw)
    try:
        yield counter
    finally:
        S.open_parquet = saved


def _jpeg_pool(count: int, kb: int, seed: int) -> list[bytes]:
    """``count`` distinct JPEGs of about ``kb`` KB (smoothed noise, quality 90)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    side = 64
    out = []
    for _ in range(count):
        while True:
            x = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(x).save(buf, format="JPEG", quality=90)
            if buf.tell() >= kb * 1000 * 0.9 or side >= 2048:
                break
            side = int(side * 1.1) + 1
        out.append(buf.getvalue())
    return out


def make_dataset(
    folder: Path, *, files: int, rows: int, image_kb: int, row_group: int = 100, seed: int = 0
) -> list[str]:
    """Pick-a-Pic-layout parquet files under ``folder`` (every 10th row a tie); each image a
    pool JPEG plus 8 unique trailing bytes (JPEG readers ignore bytes after EOI), so no two
    cells are equal and parquet cannot dictionary-encode them away."""
    from snpo.data import write_pickapic_parquet

    folder.mkdir(parents=True, exist_ok=True)
    pool = _jpeg_pool(16, image_kb, seed) if image_kb > 0 else [b"\xff\xd8\xff\xd9"]
    rng = np.random.default_rng(seed)
    paths = []
    for f in range(files):
        out = []
        for i in range(rows):
            tag0 = int(f * rows * 2 + i * 2).to_bytes(8, "little")
            tag1 = int(f * rows * 2 + i * 2 + 1).to_bytes(8, "little")
            a, b = rng.integers(0, len(pool), size=2)
            label = 0.5 if i % 10 == 9 else float(rng.integers(0, 2))
            out.append(
                {
                    "caption": f"prompt {f}-{i}",
                    "jpg_0": pool[a] + tag0,
                    "jpg_1": pool[b] + tag1,
                    "label_0": label,
                }
            )
        p = folder / f"train-{f:05d}-of-{files:05d}.parquet"
        write_pickapic_parquet(p, out, row_group_size=row_group)
        paths.append(str(p))
    return paths


# ---------------------------------------------------------------------------------------------
# measurement
def contender_keys(name: str, source, *, pairs: int, window: int, epoch: int) -> list[int]:
    """The first ``pairs`` pair indices of ``name``'s order in ``epoch`` (micro-batches of 8)."""
    from snpo.data import PairOrder

    n = len(source)
    pairs = pairs or (n // MICRO) * MICRO  # 0: one epoch
    if name == "sequential":
        return [(epoch * pairs + k) % n for k in range(pairs)]
    kw = {"groups": source.row_groups(), "window": window} if name == "windowed" else {}
    order = PairOrder(n, seed=0, rank=0, world=1, micro=MICRO, **kw)
    start = epoch * order.batches_per_epoch
    keys = [i for g in range(start, start + -(-pairs // MICRO)) for _, i in order.batch(g)]
    return keys[:pairs]


def measure_one(files: list[str], name: str, *, pairs: int, window: int, epoch: int) -> dict:
    """Wall/CPU seconds and bytes read of reading ``pairs`` pairs in ``name``'s order from a
    freshly opened source (opening not timed)."""
    import resource

    from snpo.data.sources import PickapicParquet

    with counting_reads() as read:
        src = PickapicParquet(files, row_group_cache=window if name == "windowed" else 1)
        keys = contender_keys(name, src, pairs=pairs, window=window, epoch=epoch)
        opened = read[0]
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        c0, t0 = H.cpu_time_s(), time.perf_counter()
        for i in keys:
            src.get(i)
        wall, cpu = time.perf_counter() - t0, H.cpu_time_s() - c0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        nbytes = read[0] - opened
    return {
        "contender": name,
        "pairs": len(keys),
        "wall_s": wall,
        "cpu_s": cpu,
        "user_s": r1.ru_utime - r0.ru_utime,
        "sys_s": r1.ru_stime - r0.ru_stime,
        "minor_faults": r1.ru_minflt - r0.ru_minflt,
        "bytes_read": nbytes,
        "row_group_reads": src.cache.reads,
        "pairs_per_s": len(keys) / wall if wall > 0 else float("nan"),
        "bytes_per_pair": nbytes / max(len(keys), 1),
    }


def measure_isolated(files: list[str], name: str, *, pairs: int, window: int, epoch: int) -> dict:
    """:func:`measure_one` in a fresh interpreter, after an untimed epoch of the same contender
    there (another epoch, a fresh source): the allocator state is the contender's own steady
    state, not what the previous contender left (the global order's ~1 row-group read per pair
    makes the allocator return memory, which the next contender then faults back in)."""
    import subprocess

    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "benchmarks.data_order", "--child", name, str(window)]
    cmd += [str(epoch), str(pairs), *files]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"data_order child {name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(argv: list[str]) -> int:
    name, window, epoch, pairs, files = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), argv[4:]
    measure_one(files, name, pairs=pairs, window=window, epoch=epoch + 1000)  # warm-up
    print(json.dumps(measure_one(files, name, pairs=pairs, window=window, epoch=epoch)))
    sys.stdout.flush()
    # pyarrow's IO threads can still hold the Python file wrappers at interpreter shutdown
    # ("terminate called without an active exception"): leave without finalizing
    os._exit(0)


def measure_orders(
    files: list[str],
    *,
    rounds: int,
    pairs: int,
    window: int,
    contenders=CONTENDERS,
    warmup: int = 1,
    global_pairs: int | None = None,
    isolated: bool = False,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Every contender once per round, the order rotated each round; round r reads epoch r.

    ``global_pairs``: fewer pairs for the global order (its cost per pair is flat: one
    row-group read each), so that rounds stay short. ``isolated``: each measurement in its own
    interpreter (:func:`measure_isolated`). The first ``warmup`` rounds are recorded (``warmup: true``) but left out of
    :func:`summarize`: a fresh process first-touches the memory of the row groups it holds
    (page faults: system time, K × a row group for the windowed order), which a training
    worker pays once and these few-row-group sets would otherwise charge to every epoch."""
    out = []
    for r in range(warmup + rounds):
        for name in H.rotated(contenders, r):
            n = global_pairs if name == "global" and global_pairs else pairs
            run = measure_isolated if isolated else measure_one
            m = run(files, name, pairs=n, window=window, epoch=r)
            m["round"], m["warmup"] = r, r < warmup
            tag = "warm-up" if r < warmup else f"round {r - warmup + 1}/{rounds}"
            log(
                f"{tag} {name:>10}: {m['pairs_per_s']:8.1f} pairs/s, "
                f"{m['bytes_per_pair'] / 1e6:6.2f} MB/pair, cpu {m['cpu_s']:.2f} s "
                f"(sys {m['sys_s']:.2f} s)"
            )
            out.append(m)
    return out


def summarize(rows: list[dict]) -> dict[str, dict[str, Any]]:
    """Per contender: median pairs/s, CPU (and system) seconds per pair, bytes per pair, and
    the ratio to sequential (of the same rounds: ``-kK`` rows to ``sequential-kK``) of the
    median wall and CPU time per pair."""
    out: dict[str, dict[str, Any]] = {}
    rows = [r for r in rows if not r.get("warmup")]
    for name in dict.fromkeys(r["contender"] for r in rows):
        mine = [r for r in rows if r["contender"] == name]
        out[name] = {
            "rounds": len(mine),
            "pairs_per_s": statistics.median(r["pairs_per_s"] for r in mine),
            "cpu_s_per_pair": statistics.median(r["cpu_s"] / r["pairs"] for r in mine),
            "sys_s_per_pair": statistics.median(r["sys_s"] / r["pairs"] for r in mine),
            "wall_s_per_pair": statistics.median(r["wall_s"] / r["pairs"] for r in mine),
            "bytes_per_pair": statistics.median(r["bytes_per_pair"] for r in mine),
            "row_group_reads": statistics.median(r["row_group_reads"] for r in mine),
        }
    for name, s in out.items():  # "windowed-k2" against "sequential-k2", its own rounds
        seq = out.get("sequential" + name[len(name.split("-k")[0]) :])
        s["wall_vs_sequential"] = s["wall_s_per_pair"] / seq["wall_s_per_pair"] if seq else None
        s["cpu_vs_sequential"] = s["cpu_s_per_pair"] / seq["cpu_s_per_pair"] if seq else None
    return out


def measure_startup(folder: Path, *, files: int, rows: int) -> dict:
    """Open ``files`` footer-sized shards (real schema, 4-byte images) as one source: seconds
    (wall, CPU) and bytes read, against the files' total and footer sizes."""
    import pyarrow.parquet as pq

    from snpo.data.sources import PickapicParquet

    t0 = time.perf_counter()
    paths = make_dataset(folder, files=files, rows=rows, image_kb=0, seed=1)
    gen_s = time.perf_counter() - t0
    total = sum(Path(p).stat().st_size for p in paths)
    footers = labels = 0
    for p in paths:
        md = pq.ParquetFile(p).metadata
        footers += md.serialized_size
        for g in range(md.num_row_groups):
            for c in range(md.num_columns):
                col = md.row_group(g).column(c)
                if col.path_in_schema in ("label_0", "has_label"):
                    labels += col.total_compressed_size
    with counting_reads() as read:
        c0, t0 = H.cpu_time_s(), time.perf_counter()
        src = PickapicParquet(paths)
        wall, cpu = time.perf_counter() - t0, H.cpu_time_s() - c0
    return {
        "files": files,
        "rows_per_file": rows,
        "rows": files * rows,
        "pairs": len(src),
        "generate_s": gen_s,
        "open_wall_s": wall,
        "open_cpu_s": cpu,
        "bytes_read": read[0],
        "bytes_read_per_file": read[0] / files,
        "file_bytes": total,
        "footer_bytes": footers,
        "label_bytes": labels,
        # what opening may read: per file pyarrow's 64 KiB tail read, the footer, the labels
        "allowed_bytes": files * 64 * 1024 + footers + labels,
    }


# ---------------------------------------------------------------------------------------------
# report
def render(res: dict) -> str:
    dev = res["device"]
    pairs = res["pairs"] or "one epoch of"
    lines = [
        f"# Data order — {dev['name']}, {res['date']}",
        "",
        f"{res['files']} files × {res['rows']} rows (row groups of 100, "
        f"~{res['file_bytes'] / (2e3 * res['files'] * res['rows']):.0f} KB per JPEG, "
        f"{res['file_bytes'] / 1e6:.0f} MB), {pairs} pairs per contender and "
        f"round, micro-batches of {MICRO}, windowed K = {res['window']}, {res['rounds']} "
        f"interleaved rounds after {res['warmup']} warm-up round(s), "
        + (
            "each measurement in a fresh interpreter after an untimed epoch of its own, "
            if res.get("isolated")
            else "all in one process, "
        )
        + "files in the OS page cache; "
        "`PickapicParquet.get` (row-group read + cell extraction, no JPEG decode). "
        "Medians over rounds.",
        "",
        "| order | pairs/s | CPU ms/pair | of it system | MB read/pair | row-group reads "
        "| wall vs sequential | CPU vs sequential |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in res["summary"].items():
        lines.append(
            f"| {name} | {s['pairs_per_s']:,.0f} | {s['cpu_s_per_pair'] * 1e3:.2f} | "
            f"{s['sys_s_per_pair'] * 1e3:.2f} | "
            f"{s['bytes_per_pair'] / 1e6:.2f} | {s['row_group_reads']:.0f} | "
            f"{s['wall_vs_sequential']:.2f}× | {s['cpu_vs_sequential']:.2f}× |"
        )
    for name, s in res["summary"].items():
        if name.startswith("windowed"):
            w, c = s["wall_vs_sequential"], s["cpu_vs_sequential"]
            lines.append(
                f"\n{name} vs sequential: {w:.2f}× wall, {c:.2f}× CPU (target: ≤ 2×: "
                + ("pass" if w <= 2.0 else "miss")
                + ")."
            )
    st = res.get("startup")
    if st:
        lines += [
            "",
            f"Start-up: opening {st['files']} shards × {st['rows_per_file']} rows "
            f"({st['rows']:,} rows, real schema, 4-byte images, row groups of 100): "
            f"{st['open_wall_s']:.2f} s wall, {st['open_cpu_s']:.2f} s CPU, "
            f"{st['bytes_read'] / 1e6:.1f} MB read ({st['bytes_read_per_file'] / 1e3:.1f} KB a "
            f"file; footers {st['footer_bytes'] / 1e6:.1f} MB, label columns "
            f"{st['label_bytes'] / 1e6:.2f} MB, files {st['file_bytes'] / 1e6:.1f} MB; "
            f"allowed: 64 KiB tail read + footer + labels per file = "
            f"{st['allowed_bytes'] / 1e6:.1f} MB: "
            + ("within" if st["bytes_read"] <= st["allowed_bytes"] else "OVER")
            + "). No image byte is read at start-up: the label read runs without pyarrow's "
            "read coalescing, which would also pull in the small columns around them.",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=3)
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--image-kb", type=int, default=168)
    ap.add_argument(
        "--pairs", type=int, default=0, help="pairs per contender and round (0: one epoch)"
    )
    ap.add_argument("--global-pairs", type=int, default=200, help="pairs of the global order")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument(
        "--also-window", type=int, default=2, help="a second K, measured beside sequential (0: no)"
    )
    ap.add_argument("--window", type=int, default=None, help="K (default: the config default)")
    ap.add_argument("--startup-files", type=int, default=645, help="0: skip the start-up part")
    ap.add_argument("--startup-rows", type=int, default=1487)
    ap.add_argument("--out", type=Path, default=REPO / ".benchmarks" / "snpo")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument(
        "--in-process", action="store_true", help="all contenders in this process (faster)"
    )
    a = ap.parse_args(argv)
    if a.child:
        return _child(a.child)

    import torch

    from snpo.config import TrainConfig

    from .conftest import collect_versions, describe_device

    window = a.window or TrainConfig().data_window_row_groups
    tmp = None
    if a.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="snpo-data-order-")
        a.work = Path(tmp.name)
    t0 = time.perf_counter()
    files = make_dataset(a.work / "order", files=a.files, rows=a.rows, image_kb=a.image_kb)
    print(f"generated {len(files)} files in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = measure_orders(
        files,
        rounds=a.rounds,
        pairs=a.pairs,
        window=window,
        warmup=a.warmup,
        global_pairs=a.global_pairs,
        isolated=not a.in_process,
    )
    if a.also_window:  # the same set with another K, its own rounds
        extra = measure_orders(
            files,
            rounds=a.rounds,
            pairs=a.pairs,
            window=a.also_window,
            warmup=a.warmup,
            contenders=("sequential", "windowed"),
            isolated=not a.in_process,
        )
        for m in extra:
            m["contender"] = f"{m['contender']}-k{a.also_window}"
        rows += extra
    startup = None
    if a.startup_files > 0:
        startup = measure_startup(a.work / "startup", files=a.startup_files, rows=a.startup_rows)
        print(f"start-up: {json.dumps(startup)}", flush=True)
    now = _dt.datetime.now(_dt.timezone.utc)
    dev = describe_device(torch.device("cpu"))
    res = {
        "date": now.date().isoformat(),
        "timestamp": now.isoformat(timespec="seconds"),
        "device": dev,
        "versions": collect_versions(),
        "files": a.files,
        "rows": a.rows,
        "image_kb": a.image_kb,
        "file_bytes": sum(Path(f).stat().st_size for f in files),
        "pairs": a.pairs,
        "global_pairs": a.global_pairs,
        "also_window": a.also_window,
        "rounds": a.rounds,
        "warmup": a.warmup,
        "isolated": not a.in_process,
        "window": window,
        "micro": MICRO,
        "measurements": rows,
        "summary": summarize(rows),
        "startup": startup,
    }
    json_path, md_path = R.write_results(
        res, a.out, kind="data-order", render=lambda r: render(r) + "\n"
    )
    print(md_path.read_text(), end="")
    print(f"wrote {json_path} and .md")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
