"""A run's ``metrics.jsonl``: one JSON object per optimizer step, written by the trainer and
read by ``snpo plot``, the model card and the trainer's resume.

A *record* is a JSON object with a numeric ``step``; any other line (a run killed mid-write
leaves a torn last line) is *torn*: skipped by every reader and counted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def parse_line(line: str) -> dict | None:
    """The record of one line, or None when the line is torn (not an object with a numeric step)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if not isinstance(rec, dict):
        return None
    step = rec.get("step")
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step):
        return None
    return rec


def read_lines(path: str | Path) -> tuple[list[tuple[str, dict]], int]:
    """([(line, record)] in file order, number of torn lines) of ``path``; blank lines are
    neither. The file must exist."""
    out, torn = [], 0
    for line in Path(path).read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        rec = parse_line(line)
        if rec is None:
            torn += 1
        else:
            out.append((line, rec))
    return out, torn


def read_records(path: str | Path, until_step: float | None = None) -> tuple[list[dict], int]:
    """(records with step ≤ ``until_step`` (all when None), number of torn lines) of ``path``."""
    lines, torn = read_lines(path)
    recs = [r for _, r in lines if until_step is None or r["step"] <= until_step]
    return recs, torn
