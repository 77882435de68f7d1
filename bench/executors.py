"""Executors: where the jobs of ``bench run`` execute.

- This process (``--workers 1``): one job after the other.
- A local process pool (``--workers N``): with several GPUs worker i uses ``cuda:(i mod #GPUs)``; each worker
  runs ``max(1, cores // N)`` torch threads so N workers do not oversubscribe the cores. Workers are forked
  from one fresh server process that imported bench once (the ``forkserver`` start method, where the platform
  has it; else ``spawn``): torch's and bench's initialised modules (~250 MB per process) are then shared by
  the workers rather than built again in each, and the cohort's features are shared through the feature
  store (bench/data/featurestore.py), so N workers cost little more memory than one. Workers send each
  validation check of their jobs to the progress display through a queue.
- Slurm (``--executor slurm``): the jobs not yet on disk as one job array through submitit; the call returns
  the job ids without waiting, and ``bench report`` collects the results once they are there.

Every job runs under its claim (bench/locks.py). A job claimed by a live process elsewhere is left to it and
waited for; a stale claim (its process killed) is recovered and the job run here. So a killed run resumes
where it stopped, and several processes or array tasks can share one output folder without running a fold
twice.
"""

from __future__ import annotations

import dataclasses
import gc
import multiprocessing as mp
import os
import queue
import time
from collections.abc import Callable, Container, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .device import bind_worker
from .errors import BenchError, plain_warnings
from .jobs import Job, plan_job, run_job
from .locks import claim_path, describe_holder, try_claim
from .store import fold_status, remove_stale_temporaries
from .taskdata import RunOptions, TaskData

__all__ = [
    "POLL_S",
    "SlurmOptions",
    "process_pool",
    "run_claimed",
    "run_jobs",
    "submit_slurm",
]

POLL_S = 1.0  # how often a process whose remaining jobs are all claimed elsewhere looks again


def _label(data: TaskData, job: Job) -> str:
    return f"{data.tracked_name(job.method)} fold {job.fold}"


def _shown(data: TaskData, job: Job) -> str:
    """How the progress display names a job."""
    return f"{data.task.name} · {data.tracked_name(job.method)} · fold {job.fold}"


def _is_done(data: TaskData, job: Job, opts: RunOptions) -> bool:
    plan = plan_job(data, job, opts)
    return fold_status(plan.path, plan.hash) == "done"


def run_claimed(
    data: TaskData,
    job: Job,
    opts: RunOptions,
    on_check: Callable[[int, int, dict[str, Any]], Any] | None = None,
) -> str:
    """Run ``job`` under its claim: ``skipped`` (already on disk), ``trained``, or ``busy`` (a live process
    elsewhere holds its claim)."""
    plan = plan_job(data, job, opts)
    if fold_status(plan.path, plan.hash) == "done":
        return "skipped"
    claim = try_claim(
        claim_path(plan.path), _label(data, job), Path(opts.out) / data.task.name / "claims.log"
    )
    if claim is None:
        return "busy"
    with claim:  # run_job looks at the disk again: another process may have finished the job meanwhile
        remove_stale_temporaries(plan.path)
        claim.outcome = run_job(data, job, opts, on_check=on_check)
    return claim.outcome


def run_jobs(
    data: TaskData, jobs: Sequence[Job], opts: RunOptions, progress: Any | None = None
) -> dict[Job, str]:
    """Run ``jobs`` here or in ``opts.workers`` processes until each is on disk; returns each job's status
    (``skipped`` or ``trained``; jobs another process ran count as ``skipped``). ``progress``: a
    :class:`bench.progress.RunProgress`, or None."""
    todo = [job for job in jobs if not _is_done(data, job, opts)]
    statuses = {job: "skipped" for job in jobs if job not in todo}
    workers = min(opts.workers, len(todo))
    if progress is not None and todo:
        progress.start(f"{data.task.name}: {len(todo)} folds to train", len(todo), max(1, workers))
    if workers > 1:
        statuses |= _run_pool(data, todo, opts, workers, progress)
    else:
        statuses |= _run_here(data, todo, opts, progress)
    return statuses


def _check_text(record: dict[str, Any]) -> str:
    return f"val AUC {record['val_auc']:.3f}"


def _reporter(progress: Any, job: Job) -> Callable[[int, int, dict[str, Any]], None]:
    def on_check(check: int, cap: int, record: dict[str, Any]) -> None:
        progress.fold_checked(job, record["updates"], cap, _check_text(record))

    return on_check


def _busy_text(data: TaskData, job: Job, opts: RunOptions) -> str:
    return f"running elsewhere ({describe_holder(claim_path(plan_job(data, job, opts).path))}), waiting"


def _run_here(data: TaskData, jobs: Sequence[Job], opts: RunOptions, progress: Any | None) -> dict[Job, str]:
    statuses: dict[Job, str] = {}
    started: set[Job] = set()
    pending = list(jobs)
    while pending:
        waiting = []
        for job in pending:
            on_check = None
            if progress is not None:
                if job not in started:
                    progress.fold_started(job, _shown(data, job))
                    started.add(job)
                on_check = _reporter(progress, job)
            status = run_claimed(data, job, opts, on_check)
            if status == "busy":
                waiting.append(job)
                if progress is not None:
                    progress.fold_waiting(job, _busy_text(data, job, opts))
            else:
                statuses[job] = status
                if progress is not None:
                    progress.fold_finished(job, status)
        if len(waiting) == len(pending):
            time.sleep(POLL_S)
        pending = waiting
    return statuses


_WORKER: dict[str, Any] = {}


def _enter_worker(
    env: dict[str, str], cwd: str, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]
) -> None:
    gc.freeze()  # the objects forked from the server: the collector never writes to (so never copies) them
    os.environ.clear()  # a forkserver's children start with the server's environment and folder, not ours
    os.environ.update(env)
    os.chdir(cwd)
    plain_warnings()
    if initializer is not None:
        initializer(*initargs)


def _init_worker(
    slots: Any, workers: int, data: TaskData, opts: RunOptions, messages: Any | None = None
) -> None:
    device = bind_worker(opts.device, slots.get(), workers)
    _WORKER.update(
        data=data, opts=dataclasses.replace(opts, device=str(device), quiet=True), messages=messages
    )


def _run_in_worker(job: Job) -> str:
    """Run ``job``; its start and validation checks go to the parent's progress display, if it has one."""
    messages = _WORKER["messages"]
    on_check = None
    if messages is not None:
        messages.put(("start", job, 0, 0, ""))

        def on_check(check: int, cap: int, record: dict[str, Any]) -> None:
            messages.put(("check", job, record["updates"], cap, _check_text(record)))

    return run_claimed(_WORKER["data"], job, _WORKER["opts"], on_check)


def _relay(messages: Any, progress: Any, data: TaskData, ended: Container[Job]) -> None:
    """Pass the workers' messages waiting in the queue on to the progress display (none about the jobs
    that ``ended`` already: a message may arrive after its job's result)."""
    while True:
        try:
            kind, job, updates, cap, text = messages.get_nowait()
        except queue.Empty:
            return
        if job in ended:
            continue
        if kind == "start":
            progress.fold_started(job, _shown(data, job))
        else:
            progress.fold_checked(job, updates, cap, text)


def _pool_context(preload: Sequence[str] = ()) -> Any:
    """The start method of the pool's workers: ``forkserver`` (see the module docstring; the server is a new
    process, so nothing of this one's state, CUDA included, is forked), else ``spawn``. ``preload``: more
    modules the server imports, when this call starts it."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", __name__, *preload])
    return ctx


def process_pool(
    workers: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
    preload: Sequence[str] = (),
    context: Any | None = None,
) -> ProcessPoolExecutor:
    """A pool of ``workers`` processes forked from the forkserver (else spawned), each starting in this
    process's environment and folder with the server's pages frozen, then running ``initializer``."""
    ctx = context or _pool_context(preload)
    return ProcessPoolExecutor(
        workers,
        mp_context=ctx,
        initializer=_enter_worker,
        initargs=(dict(os.environ), os.getcwd(), initializer, initargs),
    )


def _run_pool(
    data: TaskData, jobs: Sequence[Job], opts: RunOptions, workers: int, progress: Any | None
) -> dict[Job, str]:
    ctx = _pool_context()
    slots = ctx.Queue()
    for slot in range(workers):
        slots.put(slot)
    messages = None if progress is None else ctx.Queue()
    statuses: dict[Job, str] = {}
    with process_pool(workers, _init_worker, (slots, workers, data, opts, messages), context=ctx) as pool:
        pending = list(jobs)
        while pending:
            futures = {pool.submit(_run_in_worker, job): job for job in pending}
            waiting = []
            try:
                running = set(futures)
                while running:
                    finished, running = wait(running, timeout=POLL_S, return_when=FIRST_COMPLETED)
                    if messages is not None:
                        _relay(messages, progress, data, statuses)
                    for future in finished:
                        job, status = futures[future], future.result()
                        if status == "busy":
                            waiting.append(job)
                        else:
                            statuses[job] = status
                            if progress is not None:
                                progress.fold_finished(job, status, _shown(data, job))
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            if waiting:
                time.sleep(POLL_S)
            pending = waiting
    return statuses


@dataclass(frozen=True)
class SlurmOptions:
    """Resources of each array task (one job = one task)."""

    partition: str | None = None
    gpus: int = 1
    time_min: int = 240
    mem_gb: int = 32
    cpus: int = 8
    account: str | None = None
    array_parallelism: int = 64
    extra: dict[str, str] = field(default_factory=dict)  # any other sbatch option, e.g. {"qos": "high"}

    def parameters(self, name: str) -> dict[str, Any]:
        """submitit's ``update_parameters`` keywords (``slurm_*`` ones are ignored by the local executor)."""
        params: dict[str, Any] = {
            "name": name,
            "timeout_min": self.time_min,
            "mem_gb": self.mem_gb,
            "cpus_per_task": self.cpus,
            "gpus_per_node": self.gpus,
            "nodes": 1,
            "tasks_per_node": 1,
            "slurm_array_parallelism": self.array_parallelism,
        }
        if self.partition:
            params["slurm_partition"] = self.partition
        if self.account:
            params["slurm_account"] = self.account
        if self.extra:
            params["slurm_additional_parameters"] = dict(self.extra)
        return params


def _slurm_task(data: TaskData, job: Job, opts: RunOptions) -> str:
    """One array task: run the job under its claim (``busy`` when another process already runs it)."""
    return run_claimed(data, job, opts)


def submit_slurm(
    data: TaskData, jobs: Sequence[Job], opts: RunOptions, slurm: SlurmOptions, cluster: str = "slurm"
) -> list[Any]:
    """Submit the jobs not yet on disk as one Slurm job array; returns submitit's job handles (``.job_id``).

    ``cluster`` is submitit's: ``slurm``, or ``local`` to run the same pickled tasks as local processes
    (tests). Logs go to ``<out>/<task>/slurm/<job id>/``.
    """
    import submitit

    opts = dataclasses.replace(opts, out=Path(opts.out).resolve(), quiet=True)
    todo = [job for job in jobs if not _is_done(data, job, opts)]
    if not todo:
        return []
    try:
        executor = submitit.AutoExecutor(folder=opts.out / data.task.name / "slurm" / "%j", cluster=cluster)
    except RuntimeError as exc:  # submitit: no srun/sbatch on this machine
        raise BenchError(
            f"--executor {cluster}: {exc} Submit from a node of the cluster, or run here with --workers N."
        ) from exc
    executor.update_parameters(**slurm.parameters(f"bench-{data.task.name}"))
    return executor.map_array(_slurm_task, [data] * len(todo), todo, [opts] * len(todo))
