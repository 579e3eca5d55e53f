"""The comparison's job runner: dependency order, parallel workers, failures that name the job."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from snpo.world.jobs import Job, JobError, check_jobs, run_jobs


def _stamp(path: str, key: str, sleep: float = 0.0) -> dict:
    """Append (key, start, end) to the JSON-lines file ``path`` (shared by processes)."""
    start = time.time()
    time.sleep(sleep)
    with open(path, "a") as fh:
        fh.write(json.dumps({"key": key, "start": start, "end": time.time()}) + "\n")
    return {"key": key}


def _boom(message: str) -> None:
    raise ValueError(message)


def _events(path: Path) -> dict[str, dict]:
    return {r["key"]: r for r in map(json.loads, path.read_text().splitlines())}


def _diamond(log: Path, sleep: float = 0.0) -> list[Job]:
    p = str(log)
    return [
        Job("d", _stamp, {"path": p, "key": "d"}, deps=("b", "c")),  # listed first, runs last
        Job("a", _stamp, {"path": p, "key": "a", "sleep": sleep}),
        Job("b", _stamp, {"path": p, "key": "b", "sleep": sleep}, deps=("a",)),
        Job("c", _stamp, {"path": p, "key": "c", "sleep": sleep}, deps=("a",)),
    ]


@pytest.mark.parametrize("workers", [1, 2])
def test_dependencies_finish_before_their_dependents_start(tmp_path, workers):
    log = tmp_path / "log.jsonl"
    seen = []
    res = run_jobs(
        _diamond(log, 0.1), workers=workers, on_event=lambda k, j, *_: seen.append((k, j.key))
    )
    assert res == {k: {"key": k} for k in "abcd"}
    ev = _events(log)
    for job, deps in (("b", "a"), ("c", "a"), ("d", "b"), ("d", "c")):
        assert ev[deps]["end"] <= ev[job]["start"], (job, deps, ev)
    assert ("done", "d") in seen and seen.index(("start", "d")) > seen.index(("done", "b"))


def test_bad_job_lists_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="two jobs have the key 'a'"):
        check_jobs([Job("a", _boom), Job("a", _boom)])
    with pytest.raises(ValueError, match="'b' depends on 'x', which is not a job"):
        check_jobs([Job("b", _boom, deps=("x",))])
    with pytest.raises(ValueError, match="depend on each other"):
        check_jobs([Job("a", _boom, deps=("b",)), Job("b", _boom, deps=("a",))])


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failure_names_the_job_and_stops_its_dependents(tmp_path, workers):
    log = tmp_path / "log.jsonl"
    jobs = [
        Job("ok", _stamp, {"path": str(log), "key": "ok"}),
        Job("bad", _boom, {"message": "the cache is stale"}),
        Job("after", _stamp, {"path": str(log), "key": "after"}, deps=("bad",)),
    ]
    with pytest.raises(JobError, match="job 'bad' failed") as err:
        run_jobs(jobs, workers=workers)
    assert err.value.key == "bad"
    assert "ValueError: the cache is stale" in str(err.value)  # the worker's traceback
    assert "after" not in (log.read_text() if log.exists() else "")
