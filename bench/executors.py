"""Executors: where the jobs of ``bench run`` execute.

- This process (``--workers 1``): one job after the other, each with an epoch progress bar.
- A local process pool (``--workers N``): with several GPUs worker i uses ``cuda:(i mod #GPUs)``; each worker
  runs ``max(1, cores // N)`` torch threads so N workers do not oversubscribe the cores. Workers are forked
  from one fresh server process that imported bench once (the ``forkserver`` start method, where the platform
  has it; else ``spawn``): torch's and bench's initialised modules (~250 MB per process) are then shared by
  the workers rather than built again in each, and the cohort's features are shared through the feature
  store (bench/data/featurestore.py), so N workers cost little more memory than one.
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
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
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


def _is_done(data: TaskData, job: Job, opts: RunOptions) -> bool:
    plan = plan_job(data, job, opts)
    return fold_status(plan.path, plan.hash) == "done"


def run_claimed(
    data: TaskData,
    job: Job,
    opts: RunOptions,
    on_epoch: Callable[[int, int, dict[str, float]], Any] | None = None,
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
        claim.outcome = run_job(data, job, opts, on_epoch=on_epoch)
    return claim.outcome


def run_jobs(
    data: TaskData, jobs: Sequence[Job], opts: RunOptions, progress: Any | None = None
) -> dict[Job, str]:
    """Run ``jobs`` here or in ``opts.workers`` processes until each is on disk; returns each job's status
    (``skipped`` or ``trained``; jobs another process ran count as ``skipped``)."""
    todo = [job for job in jobs if not _is_done(data, job, opts)]
    statuses = {job: "skipped" for job in jobs if job not in todo}
    workers = min(opts.workers, len(todo))
    if workers > 1:
        statuses |= _run_pool(data, todo, opts, workers, progress)
    else:
        statuses |= _run_here(data, todo, opts, progress)
    return statuses


def _epoch_reporter(progress: Any, handle: Any, label: str) -> Callable[[int, int, dict[str, float]], None]:
    def on_epoch(epoch: int, total: int, record: dict[str, float]) -> None:
        progress.update(
            handle, total=total, completed=epoch + 1, description=f"{label} · val AUC {record['val_auc']:.3f}"
        )

    return on_epoch


def _busy_text(data: TaskData, job: Job, opts: RunOptions) -> str:
    return f"running elsewhere ({describe_holder(claim_path(plan_job(data, job, opts).path))}), waiting"


def _run_here(data: TaskData, jobs: Sequence[Job], opts: RunOptions, progress: Any | None) -> dict[Job, str]:
    statuses: dict[Job, str] = {}
    handles: dict[Job, Any] = {}
    pending = list(jobs)
    while pending:
        waiting = []
        for job in pending:
            label = f"{data.task.name} · {_label(data, job)}"
            on_epoch = None
            if progress is not None:
                if job not in handles:
                    handles[job] = progress.add_task(label, total=None)
                on_epoch = _epoch_reporter(progress, handles[job], label)
            status = run_claimed(data, job, opts, on_epoch)
            if status == "busy":
                waiting.append(job)
            else:
                statuses[job] = status
            if progress is not None:
                text = _busy_text(data, job, opts) if status == "busy" else status
                done = status != "busy"
                progress.update(handles[job], total=1, completed=int(done), description=f"{label} · {text}")
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


def _init_worker(slots: Any, workers: int, data: TaskData, opts: RunOptions) -> None:
    device = bind_worker(opts.device, slots.get(), workers)
    _WORKER.update(data=data, opts=dataclasses.replace(opts, device=str(device), quiet=True))


def _run_in_worker(job: Job) -> str:
    return run_claimed(_WORKER["data"], job, _WORKER["opts"])


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
    bar = None
    if progress is not None:
        bar = progress.add_task(f"{data.task.name} · {len(jobs)} jobs on {workers} workers", total=len(jobs))
    statuses: dict[Job, str] = {}
    with process_pool(workers, _init_worker, (slots, workers, data, opts), context=ctx) as pool:
        pending = list(jobs)
        while pending:
            futures = {pool.submit(_run_in_worker, job): job for job in pending}
            waiting = []
            try:
                for future in as_completed(futures):
                    job, status = futures[future], future.result()
                    if status == "busy":
                        waiting.append(job)
                        continue
                    statuses[job] = status
                    if bar is not None:
                        progress.update(
                            bar, advance=1, description=f"{data.task.name} · {_label(data, job)} {status}"
                        )
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
