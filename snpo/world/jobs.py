"""A small dependency-ordered job runner: the comparison's trainings, caches and evaluations run
side by side on the machine's cores.

A :class:`Job` is a module-level function with keyword arguments and the keys of the jobs it
needs first. :func:`run_jobs` starts every job whose dependencies are done, up to ``workers`` at
a time, in separate processes (``spawn``, so each has its own torch and thread count), in the
order given among the ready ones. With ``workers == 1`` it runs them in this process, in order,
which is what tests and debuggers want. The first failure stops the run: nothing new starts,
running jobs finish, and :class:`JobError` names the job and carries its traceback.

Jobs communicate through files, not return values: each returns a small JSON-able summary.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Job:
    """One unit of work: ``fn(**kwargs)`` once every job in ``deps`` has finished."""

    key: str
    fn: Callable[..., Any]
    kwargs: dict = field(default_factory=dict)
    deps: tuple[str, ...] = ()


class JobError(RuntimeError):
    """A job raised; ``key`` names it and the message holds its traceback."""

    def __init__(self, key: str, detail: str):
        super().__init__(f"job {key!r} failed:\n{detail}")
        self.key = key
        self.detail = detail

    def __reduce__(self):  # picklable across the process boundary
        return (JobError, (self.key, self.detail))


def check_jobs(jobs: Iterable[Job]) -> list[Job]:
    """The jobs in an order that runs every dependency first, keeping the given order where it
    allows, after checking that keys are unique, every dependency exists and there is no cycle
    (ValueError naming the problem otherwise)."""
    jobs = list(jobs)
    keys: dict[str, Job] = {}
    for j in jobs:
        if j.key in keys:
            raise ValueError(f"two jobs have the key {j.key!r}")
        keys[j.key] = j
    for j in jobs:
        for d in j.deps:
            if d not in keys:
                raise ValueError(f"job {j.key!r} depends on {d!r}, which is not a job")
    order: list[Job] = []
    placed: set[str] = set()
    pending = list(jobs)
    while pending:
        job = next((j for j in pending if all(d in placed for d in j.deps)), None)
        if job is None:
            raise ValueError(f"the jobs {sorted(j.key for j in pending)} depend on each other")
        order.append(job)
        placed.add(job.key)
        pending.remove(job)
    return order


def _call(key: str, fn: Callable[..., Any], kwargs: dict) -> Any:
    """``fn(**kwargs)``; anything it raises (SystemExit included) becomes a JobError naming
    ``key`` with the traceback as text, which crosses a process boundary intact."""
    try:
        return fn(**kwargs)
    except BaseException as err:
        raise JobError(key, traceback.format_exc()) from err


def run_jobs(
    jobs: Iterable[Job],
    *,
    workers: int = 1,
    on_event: Callable[[str, Job, float, int, int], None] | None = None,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
) -> dict[str, Any]:
    """Run ``jobs`` respecting their dependencies; returns {key: fn's return value}.

    ``on_event(kind, job, seconds, done, total)`` is called with kind "start" and "done".
    ``initializer(*initargs)`` runs once in each worker process (and here, when workers is 1).
    """
    jobs = check_jobs(jobs)
    total = len(jobs)
    results: dict[str, Any] = {}
    started: dict[str, float] = {}

    def event(kind: str, job: Job) -> None:
        if on_event is not None:
            secs = time.perf_counter() - started[job.key]
            on_event(kind, job, secs, len(results), total)

    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        for job in jobs:
            started[job.key] = time.perf_counter()
            event("start", job)
            results[job.key] = _call(job.key, job.fn, job.kwargs)
            event("done", job)
        return results

    import multiprocessing as mp

    pending = list(jobs)
    running: dict[Future, Job] = {}
    failure: JobError | None = None
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=mp.get_context("spawn"),
        initializer=initializer,
        initargs=initargs,
    ) as pool:
        while pending or running:
            if failure is None:
                for job in [j for j in pending if all(d in results for d in j.deps)]:
                    if len(running) >= workers:
                        break
                    pending.remove(job)
                    started[job.key] = time.perf_counter()
                    running[pool.submit(_call, job.key, job.fn, job.kwargs)] = job
                    event("start", job)
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = running.pop(fut)
                err = fut.exception()
                if err is None:
                    results[job.key] = fut.result()
                    event("done", job)
                elif failure is None:  # a JobError, or the pool's own (a worker died)
                    failure = err if isinstance(err, JobError) else JobError(job.key, repr(err))
    if failure is not None:
        raise failure
    return results
