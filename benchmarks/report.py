"""Results of one run → ``<device-slug>-<YYYY-MM-DD>.json`` and a markdown table beside it.

The JSON holds the device, the versions (torch, CUDA, triton, snpo, python, pytest-benchmark),
the date, the copy-bandwidth ceiling measured in the same run, why each provider did or did not
run, every row, and the pass/miss of each target. Rows marked ``"table": "trainer"`` (the
trainer-step benchmark, ``test_trainer_bench.py``) go to ``trainer_rows`` and a section of
their own. ``render_markdown`` is a pure function of that dict (unit-tested in
``test_harness.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .harness import (
    TARGET_NAMES,
    TRAINER_TARGET_NAMES,
    MiB,
    evaluate_targets,
    evaluate_trainer_targets,
    paired_speedup,
    summarize_targets,
    summarize_trainer_targets,
)

SCHEMA = 1
PROVIDER_ORDER = ("eager", "compile", "triton", "cuda")
MODE_ORDER = ("fwd", "fwdbwd")
REF_ORDER = ("ref_pred", "ref_err")
MODE_LABEL = {"fwd": "forward", "fwdbwd": "fwd+bwd"}
CPU_NOTE = (
    "CPU run: these numbers exercise the harness on tiny shapes and are NOT performance claims."
)
CPU_FULL_NOTE = (
    "CPU run with the {models} trainer rows (SNPO_BENCH_TRAINER=full or sd3): those rows are the "
    "project's CPU measurement of the trainer step against the reference step (the trainer "
    "targets are judged on them); any kernel rows and tiny-model rows only exercise the harness."
)


def add_ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copy rows, adding speedup_vs_eager and speedup_vs_compile (the baseline's median time
    over this row's, same case and mode; > 1 means faster than the baseline)."""
    base: dict[tuple[str, str, str], float] = {}
    for r in rows:
        if r.get("status") == "ok" and r["provider"] in ("eager", "compile"):
            base[(r["case"], r["mode"], r["provider"])] = r["median_ms"]
    out = []
    for r in rows:
        r = dict(r)
        for b in ("eager", "compile"):
            t = base.get((r["case"], r["mode"], b))
            ok = r.get("status") == "ok" and t is not None and r.get("median_ms")
            r[f"speedup_vs_{b}"] = t / r["median_ms"] if ok else None
        out.append(r)
    return out


def _ratio(b: dict[str, Any] | None, r: dict[str, Any], key: str) -> float | None:
    """b[key] / r[key] when both rows were measured (> 1: r is faster), else None."""
    if b is None or r.get("status") != "ok" or b.get("status") != "ok":
        return None
    x, y = b.get(key), r.get(key)
    return x / y if x and y else None


def add_trainer_ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copy trainer-step rows, adding, against the same model and pairs (> 1: this row is
    faster): speedup_vs_baseline (the live · fused · batched row's median wall time over this
    row's), speedup_vs_reference (the reference step's), cpu_speedup_vs_reference and
    cpu_speedup_vs_baseline (the same with median process CPU time), paired_speedup_vs_reference
    and paired_cpu_speedup_vs_reference (the per-round ratios against the reference row timed
    in the same rounds: :func:`benchmarks.harness.paired_speedup`), and mem_vs_baseline (peak
    memory over the baseline's)."""
    base: dict[tuple[str, int], dict[str, Any]] = {}
    ref: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("baseline"):
            base[(r["model"], r["pairs"])] = r
        if r.get("status") == "ok" and r.get("reference"):
            ref[(r["model"], r["pairs"])] = r
    out = []
    for r in rows:
        r = dict(r)
        b, f = base.get((r["model"], r["pairs"])), ref.get((r["model"], r["pairs"]))
        r["speedup_vs_baseline"] = _ratio(b, r, "median_ms")
        r["cpu_speedup_vs_baseline"] = _ratio(b, r, "cpu_median_ms")
        r["speedup_vs_reference"] = _ratio(f, r, "median_ms")
        r["cpu_speedup_vs_reference"] = _ratio(f, r, "cpu_median_ms")
        ok = f is not None and r.get("status") == "ok"
        for key, times in (
            ("speedup_vs_reference", "wall_ms"),
            ("cpu_speedup_vs_reference", "cpu_ms"),
        ):
            r[f"paired_{key}"] = (
                paired_speedup(f[times], r[times]) if ok and times in f and times in r else None
            )
        mem, bmem = r.get("peak_mem_bytes"), (b or {}).get("peak_mem_bytes")
        ok = r.get("status") == "ok" and b is not None
        r["mem_vs_baseline"] = mem / bmem if ok and mem and bmem else None
        out.append(r)
    return out


def _sort_key(r: dict[str, Any], shape_order: Sequence[str]) -> tuple:
    shape = r.get("shape", "")
    return (
        shape_order.index(shape) if shape in shape_order else len(shape_order),
        r.get("dtype") != "bf16",
        r.get("pairs", 0),
        REF_ORDER.index(r["ref"]) if r.get("ref") in REF_ORDER else 9,
        MODE_ORDER.index(r["mode"]) if r.get("mode") in MODE_ORDER else 9,
        PROVIDER_ORDER.index(r["provider"]) if r.get("provider") in PROVIDER_ORDER else 9,
    )


def build_results(
    meta: dict[str, Any], rows: Sequence[dict[str, Any]], shape_order: Sequence[str] = ()
) -> dict[str, Any]:
    """The file's content: ``meta`` (device, versions, date, copy, providers, ...) + rows +
    targets (only for runs that claim numbers, i.e. on a GPU)."""
    trainer = [r for r in rows if r.get("table") == "trainer"]
    rows = [r for r in rows if r.get("table") != "trainer"]
    rows = sorted(add_ratios(rows), key=lambda r: _sort_key(r, list(shape_order)))
    claim = bool(meta.get("claim"))
    checks = evaluate_targets(rows) if claim else []
    if not claim:
        why = "CPU run: targets are evaluated on GPU runs only"
    elif not checks:
        why = "no fused provider (triton, cuda) was measured in this run"
    else:
        why = None
    trainer = add_trainer_ratios(trainer)
    target_models = (meta.get("trainer") or {}).get("target_models") or ()
    tchecks = evaluate_trainer_targets(trainer, target_models)
    return {
        "schema": SCHEMA,
        **meta,
        "rows": rows,
        "trainer_rows": trainer,
        "trainer_targets": {
            "evaluated": bool(tchecks),
            "why_not": None
            if tchecks
            else "no row of " + ", ".join(target_models or ["a target model"]) + " was measured",
            "summary": summarize_trainer_targets(tchecks),
            "checks": tchecks,
        },
        "targets": {
            "evaluated": bool(checks),
            "why_not": why,
            "summary": summarize_targets(checks),
            "checks": checks,
        },
    }


def write_results(
    results: dict[str, Any],
    out_dir: Path,
    *,
    kind: str | None = None,
    render: Callable[[dict[str, Any]], str] | None = None,
) -> tuple[Path, Path]:
    """Write ``<slug>[-<kind>]-<date>.json`` and ``.md`` (``render``, default
    :func:`render_markdown`) into ``out_dir``; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "-".join(x for x in (results["device"]["slug"], kind, results["date"]) if x)
    json_path = out_dir / f"{stem}.json"
    md_path = out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    md_path.write_text((render or render_markdown)(results))
    return json_path, md_path


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------
def fmt_us(ms: float | None) -> str:
    if ms is None:
        return "—"
    us = ms * 1e3
    return f"{us:.1f}" if us < 1000 else f"{us:.0f}"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    if n >= MiB:
        return f"{n / MiB:.2f} MiB"
    return f"{n / 1024:.1f} KiB"


def fmt_rate(bps: float | None) -> str:
    if bps is None:
        return "—"
    return f"{bps / 1e12:.2f} TB/s" if bps >= 1e12 else f"{bps / 1e9:.1f} GB/s"


def fmt_pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.1%}"


def fmt_x(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(_escape(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    dev = results["device"]
    ver = results.get("versions", {})
    trainer = results.get("trainer_rows") or []
    kernel = bool(results.get("rows")) or not trainer
    what = (
        "`preference_loss`" + (" and trainer-step" if trainer else "") if kernel else "trainer-step"
    )
    lines = [f"# snpo {what} benchmarks — {dev['name']}, {results['date']}", ""]
    if not results.get("claim"):
        lines += [f"> **{results.get('note') or CPU_NOTE}**", ""]
    copy = results.get("copy") or {}
    copy_text = (
        f"{fmt_rate(copy.get('bytes_per_s'))} (`torch.empty_like(x).copy_(x)` on "
        f"{fmt_bytes(copy.get('buffer_bytes'))}, bytes read + written, median of "
        f"{copy.get('repeats')}, {copy.get('timer')})"
        if copy
        else "not measured"
    )
    torch_text = str(ver.get("torch"))
    if ver.get("cuda"):
        torch_text += f" (CUDA {ver['cuda']})"
    snpo_text = str(ver.get("snpo"))
    if ver.get("git"):
        snpo_text += f" (git {ver['git']})"
    providers = results.get("providers", {})
    prov_text = "; ".join(
        f"{name}: " + ("ran" if why is None else f"not run — {why}")
        for name, why in providers.items()
    )
    info = [
        ("device", f"{dev['name']} ({dev.get('detail', '')})".replace(" ()", "")),
        ("date (UTC)", f"{results['date']} ({results.get('timestamp', '')})"),
        ("torch", torch_text),
        ("triton", str(ver.get("triton"))),
        ("snpo", snpo_text),
        ("python", str(ver.get("python"))),
    ]
    if kernel:  # the preference_loss suite's settings
        info += [
            ("grid", f"{results.get('grid')} ({results.get('n_cases', '?')} cases)"),
            ("copy bandwidth", copy_text),
            ("providers", prov_text or "—"),
            ("timing", results.get("timing_note", "")),
            ("loss settings", results.get("loss_settings", "")),
        ]
    lines += _table(["", ""], [[k, v] for k, v in info])
    lines.append("")

    if not kernel:
        return "\n".join(lines + render_trainer(results))
    t = results.get("targets", {})
    lines += ["## Targets", ""]
    if not t.get("evaluated"):
        lines += [f"Not evaluated: {t.get('why_not')}.", ""]
    else:
        summary_rows = []
        for s in t["summary"].values():
            verdict = "PASS" if s["all_pass"] else "MISS"
            summary_rows.append(
                [
                    s["description"],
                    f"{verdict} ({s['passed']}/{s['checks']})",
                    f"{s['worst']['provider']} {s['worst']['case']}: {s['worst']['text']}",
                ]
            )
        lines += _table(["target", "result", "worst case"], summary_rows)
        lines += ["", "<details><summary>every check</summary>", ""]
        lines += _table(
            ["target", "provider", "case", "result"],
            [
                [
                    c["target"],
                    c["provider"],
                    c["case"],
                    ("pass: " if c["pass"] else "MISS: ") + c["text"],
                ]
                for c in t["checks"]
            ],
        )
        lines += ["", "</details>", ""]
        lines += [
            "Targets: " + "; ".join(f"`{k}` = {v}" for k, v in TARGET_NAMES.items()) + ".",
            "",
        ]

    lines += [
        "## Results",
        "",
        "median µs: device time (CUDA events; wall clock on a CPU), median over the repeats; "
        "sync µs: pytest-benchmark's wall clock of one call + synchronize (host overhead "
        "included); host µs: time to issue one call; min bytes: the fewest bytes the operation "
        "must move (see `harness.min_bytes`); % copy: achieved bandwidth over the copy "
        "bandwidth above; % copy (split): the same for the bytes a separate forward and "
        "backward must move (pred and target read again, `harness.split_bytes`); "
        "extra mem: peak allocation during one call beyond the live inputs "
        "(× the bytes of pred); × eager / × compile: the baseline's time over this one's "
        "(> 1 is faster). See benchmarks/README.md.",
        "",
    ]
    header = [
        "case",
        "mode",
        "provider",
        "median µs",
        "sync µs",
        "host µs",
        "min bytes",
        "bandwidth",
        "% copy",
        "% copy (split)",
        "extra mem (× pred)",
        "× eager",
        "× compile",
        "status",
    ]
    body = []
    for r in results.get("rows", []):
        extra = r.get("extra_mem_bytes")
        extra_text = (
            "—"
            if extra is None
            else f"{fmt_bytes(extra)} ({extra / r['pred_bytes']:.2f}×)"
            if r.get("pred_bytes")
            else fmt_bytes(extra)
        )
        status = r.get("status", "?")
        if r.get("reason"):
            status += f": {r['reason']}"
        body.append(
            [
                r["case"],
                MODE_LABEL.get(r["mode"], r["mode"]),
                r["provider"],
                fmt_us(r.get("median_ms")),
                fmt_us(r.get("sync_wall_ms")),
                fmt_us(r.get("host_ms")),
                fmt_bytes(r.get("min_bytes")),
                fmt_rate(r.get("bytes_per_s")),
                fmt_pct(r.get("frac_copy")),
                fmt_pct(r.get("frac_copy_split")),
                extra_text,
                fmt_x(r.get("speedup_vs_eager")),
                fmt_x(r.get("speedup_vs_compile")),
                status,
            ]
        )
    lines += _table(header, body)
    lines.append("")
    shapes = results.get("shape_labels") or {}
    if shapes:
        lines += ["Shapes: " + "; ".join(f"`{k}` = {v}" for k, v in shapes.items()) + ".", ""]
    if trainer:
        lines += render_trainer(results)
    return "\n".join(lines)


TRAINER_VARIANT_LABEL = {
    "ref": {
        "live": "live (VAE + text + reference)",
        "cached": "cache (latents, text, `ref_err`)",
        "reference": "**Diffusion-DPO-style reference step**",
    },
    "branches": {"batched": "one 2P forward", "split": "two forwards"},
}


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


def _paired(r: dict[str, Any]) -> str:
    """The per-round speedup against the reference on the row's judged clock: geometric mean
    [95 % interval]."""
    key = "cpu_speedup_vs_reference" if r.get("judged_on") == "cpu" else "speedup_vs_reference"
    p = r.get(f"paired_{key}")
    if not p or r.get("reference"):
        return "—"
    return f"{p['geomean']:.2f}× [{p['lo']:.2f}, {p['hi']:.2f}]"


def render_trainer_targets(results: dict[str, Any]) -> list[str]:
    t = results.get("trainer_targets") or {}
    if not t.get("evaluated"):
        return [f"Trainer targets not evaluated: {t.get('why_not') or 'no rows'}.", ""]
    body = []
    for c in t["checks"]:
        on = "CPU time" if c.get("judged_on") == "cpu" else "wall time"
        body.append(
            [
                TRAINER_TARGET_NAMES.get(c["target"], c["target"]),
                c["case"],
                on,
                ("PASS: " if c["pass"] else "MISS: ") + c["text"],
            ]
        )
    return ["### Trainer targets", "", *_table(["target", "row", "judged on", "result"], body), ""]


def render_trainer(results: dict[str, Any]) -> list[str]:
    """The trainer-step section: one row per (model, pairs, row), then the targets."""
    rows = results.get("trainer_rows") or []
    info = results.get("trainer") or {}
    lines = ["## Trainer step", ""]
    for key in ("note", "timing"):
        if info.get(key):
            lines += [info[key], ""]
    models = info.get("models") or {}
    if models:
        lines += ["Models: " + "; ".join(f"`{k}` = {v}" for k, v in models.items()) + ".", ""]
    if info.get("not_run"):
        lines += [f"Not run here: {info['not_run']}.", ""]
    header = [
        "model",
        "P",
        "inputs & reference",
        "loss",
        "branches",
        "wall median ms",
        "wall min ms",
        "CPU median ms",
        "CPU min ms",
        "steps",
        "pairs/s",
        "× reference step",
        "× reference (CPU)",
        "paired × reference",
        "× baseline",
        "peak GPU mem",
        "status",
    ]
    body = []
    for r in rows:
        status = r.get("status", "?")
        if r.get("reason"):
            status += f": {r['reason']}"
        loss = r.get("loss", "?")
        if r.get("backend"):
            loss += f" ({r['backend']})"
        pps = r.get("pairs_per_s")
        body.append(
            [
                r["model"],
                str(r["pairs"]),
                TRAINER_VARIANT_LABEL["ref"].get(r.get("ref"), str(r.get("ref"))),
                loss,
                TRAINER_VARIANT_LABEL["branches"].get(r.get("branches"), str(r.get("branches"))),
                _ms(r.get("median_ms")),
                _ms(r.get("min_ms")),
                _ms(r.get("cpu_median_ms")),
                _ms(r.get("cpu_min_ms")),
                str(r.get("repeats", "—")),
                "—" if pps is None else f"{pps:.2f}",
                fmt_x(r.get("speedup_vs_reference")),
                fmt_x(r.get("cpu_speedup_vs_reference")),
                _paired(r),
                fmt_x(r.get("speedup_vs_baseline")),
                fmt_bytes(r.get("peak_mem_bytes")),
                status,
            ]
        )
    lines += _table(header, body)
    lines += [
        "",
        "wall / CPU ms: wall clock (synchronized) and process CPU time (user + system) of one "
        "whole step, median and min over the interleaved rounds; steps: timed steps per row; "
        "pairs/s: P / wall median; × reference step: the reference row's median over this "
        "row's, wall time (× reference (CPU): CPU time; > 1 is faster); paired × reference: "
        "the per-round ratios reference / row on the judged clock (CPU time on a CPU, wall on "
        "a GPU) of the rounds both rows were timed in, their geometric mean and 95 % "
        "t-interval; × baseline: the "
        "live · fused · batched row's wall median over this row's; peak GPU mem: "
        "`max_memory_allocated` during one step, everything of the group resident (all rows "
        "share one model; `holds_bytes` in the JSON says what a run of the row keeps resident "
        "besides the policy: reference copy, VAE, text encoders).",
        "",
    ]
    lines += render_trainer_targets(results)
    return lines


def trainer_summary_lines(results: dict[str, Any]) -> list[str]:
    """One line per trainer-step row: model, P, row, wall and CPU ms, × reference, × baseline."""
    out = []
    for r in results.get("trainer_rows") or []:
        head = f"{r['model']:<10} P={r['pairs']:<2} {r['variant']:<22}"
        if r.get("status") != "ok":
            out.append(f"{head} {r.get('status')}: {r.get('reason')}")
            continue
        mem = r.get("peak_mem_bytes")
        out.append(
            f"{head} {r['median_ms']:9.1f} ms wall {r.get('cpu_median_ms', float('nan')):9.1f} "
            f"ms CPU {r['pairs_per_s']:8.2f} pairs/s  × ref "
            f"{fmt_x(r.get('speedup_vs_reference')):>7} (CPU "
            f"{fmt_x(r.get('cpu_speedup_vs_reference'))})  × base "
            f"{fmt_x(r.get('speedup_vs_baseline')):>7}"
            + ("" if mem is None else f"  peak {fmt_bytes(mem)}")
        )
    t = results.get("trainer_targets") or {}
    for c in t.get("checks") or []:
        out.append(
            f"target {c['target']} {c['case']}: {'PASS' if c['pass'] else 'MISS'} {c['text']}"
        )
    return out


# ---------------------------------------------------------------------------------------------
# A compact text summary (what the GPU script prints last)
# ---------------------------------------------------------------------------------------------
def summary_lines(results: dict[str, Any]) -> list[str]:
    """One line per (case, mode): each provider's median µs, then the best fused provider's
    fraction of copy bandwidth and speed-ups; then the targets."""
    providers = [p for p in PROVIDER_ORDER if any(r["provider"] == p for r in results["rows"])]
    head = f"{'case':<24} {'mode':<7}" + "".join(f"{p + ' µs':>12}" for p in providers)
    head += f"{'fused %copy':>12}{'× eager':>9}{'× compile':>10}"
    out = [
        f"{results['device']['name']}  {results['date']}  torch {results['versions'].get('torch')}"
        f"  triton {results['versions'].get('triton')}  copy "
        f"{fmt_rate((results.get('copy') or {}).get('bytes_per_s'))}",
        head,
    ]
    groups: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in results["rows"]:
        groups.setdefault((r["case"], r["mode"]), {})[r["provider"]] = r
    for (case, mode), by_p in groups.items():
        cells = []
        for p in providers:
            r = by_p.get(p)
            if r is None:
                cells.append(f"{'':>12}")
            elif r.get("status") != "ok":
                cells.append(f"{r.get('status', '?'):>12}")
            else:
                cells.append(f"{fmt_us(r['median_ms']):>12}")
        fused = [by_p[p] for p in ("cuda", "triton") if p in by_p and by_p[p].get("status") == "ok"]
        best = min(fused, key=lambda r: r["median_ms"]) if fused else None
        tail = (
            f"{fmt_pct(best.get('frac_copy')):>12}{fmt_x(best.get('speedup_vs_eager')):>9}"
            f"{fmt_x(best.get('speedup_vs_compile')):>10}"
            if best
            else ""
        )
        out.append(f"{case:<24} {MODE_LABEL.get(mode, mode):<7}" + "".join(cells) + tail)
    t = results.get("targets", {})
    if t.get("evaluated"):
        for name, s in t["summary"].items():
            w = s["worst"]
            out.append(
                f"target {name}: {'PASS' if s['all_pass'] else 'MISS'} {s['passed']}/"
                f"{s['checks']}; worst {w['provider']} {w['case']}: {w['text']}"
            )
    else:
        out.append(f"targets not evaluated: {t.get('why_not')}")
    trainer = trainer_summary_lines(results)
    if trainer:
        out += ["trainer step:", *trainer]
    if not results.get("claim"):
        out.append(results.get("note") or CPU_NOTE)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Print a compact summary of a results JSON.")
    ap.add_argument("results", type=Path)
    ap.add_argument("--markdown", action="store_true", help="re-render the markdown instead")
    args = ap.parse_args(argv)
    results = json.loads(args.results.read_text())
    print(render_markdown(results) if args.markdown else "\n".join(summary_lines(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
