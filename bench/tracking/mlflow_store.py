"""The MLflow backend: experiment ``bench/<task>``, a parent run per method, a nested run per fold, through
MLflow's own client (any tracking URI; by default a SQLite store under ``--out``)."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .base import (
    MAX_PARAMS,
    Guarded,
    TrackedFold,
    Trial,
    final_metrics,
    flatten,
    fold_files,
    metric_key,
    numeric,
    run_tags,
)

__all__ = ["MLflowTracker"]

_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def _client(uri: str) -> Any:
    """An MlflowClient of ``uri``, MLflow's and Alembic's info lines silenced, short HTTP retries."""
    for var, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(var, value)
    from mlflow.tracking import MlflowClient

    for name in ("mlflow", "alembic", "urllib3.connectionpool"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return MlflowClient(tracking_uri=uri)


class MLflowTracker(Guarded):
    """Experiment ``bench/<task>``; a parent run per method, found by its tags (any process creates it once
    it is missing: the main process does so before any job, in :meth:`start`); a nested run per fold."""

    def __init__(self, uri: str, out: Path) -> None:
        self.uri, self.where, self.out = uri, f"mlflow at {uri}", str(Path(out).resolve())
        self.client = _client(uri)
        self._experiments: dict[str, str] = {}

    def _artifact_root(self) -> str | None:
        """``<store folder>/artifacts`` for a local SQLite store (MLflow's default is relative to the cwd)."""
        if self.uri.startswith("sqlite:///"):
            return Path(self.uri.removeprefix("sqlite:///")).parent.joinpath("artifacts").as_uri()
        return None

    def experiment(self, task: str) -> str:
        if task not in self._experiments:
            name = f"bench/{task}"
            if self.uri.startswith("sqlite:///"):
                Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            found = self.client.get_experiment_by_name(name)
            if found is None:
                try:
                    exp_id = self.client.create_experiment(name, artifact_location=self._artifact_root())
                except Exception:  # another process created it meanwhile
                    found = self.client.get_experiment_by_name(name)
                    if found is None:
                        raise
                    exp_id = found.experiment_id
            else:
                exp_id = found.experiment_id
            self._experiments[task] = exp_id
        return self._experiments[task]

    def parent(self, task: str, method: str, level: str = "method") -> str:
        """The run id of ``method``'s parent run (``level`` method: its folds; sweep: its trials) for this
        ``--out``, created (finished: a container) when there is none."""
        exp = self.experiment(task)
        runs = self.client.search_runs(
            [exp],
            filter_string=f"tags.`bench.level` = '{level}' and tags.`bench.method` = '{method}'",
            order_by=["attributes.start_time ASC"],
            max_results=1000,
        )
        for run in runs:
            if run.data.tags.get("bench.out") == self.out:
                return run.info.run_id
        name = method if level == "method" else f"{method} {level}"
        run = self.client.create_run(exp, tags=run_tags(self.out, task, method, level), run_name=name)
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    def start(self, task: str, methods: Sequence[str], level: str = "method") -> bool:
        self._call(lambda: [self.parent(task, m, level) for m in methods])
        return not self.dead

    def fold(self, task: str, method: str, fold: int) -> TrackedFold:
        return _MLflowFold(self, task, method, fold)

    def summary(self, task: str, summary: Any) -> None:
        def log() -> None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            for method, rows in summary.groupby("method"):
                metrics = [
                    Metric(metric_key(f"{r.cohort}/{r.metric}_{stat}"), float(getattr(r, stat)), now, 0)
                    for r in rows.itertuples()
                    for stat in ("mean", "std")
                    if not math.isnan(float(getattr(r, stat)))
                ]
                run_id = self.parent(task, str(method))
                for chunk in _chunks(metrics, 1000):
                    self.client.log_batch(run_id, metrics=chunk)

        self._call(log)

    def trial(self, task: str, method: str, fold: int, trial: Trial) -> None:
        """A run per trial, nested in the method's sweep run: the overrides as parameters, its scores."""

        def log() -> None:
            from mlflow.entities import Metric, Param

            tags = {
                **run_tags(self.out, task, method, "trial", fold),
                "mlflow.parentRunId": self.parent(task, method, "sweep"),
                "bench.trial": str(trial.number),
                "optuna.state": trial.state,
            }
            run = self.client.create_run(
                self.experiment(task), tags=tags, run_name=f"fold_{fold} trial {trial.number}"
            )
            now = int(time.time() * 1000)
            self.client.log_batch(
                run.info.run_id,
                metrics=[Metric(metric_key(k), v, now, 0) for k, v in trial.metrics().items()],
                params=[Param(k, v) for k, v in flatten(trial.params).items()][:MAX_PARAMS],
            )
            status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(trial.state, "FAILED")
            self.client.set_terminated(run.info.run_id, status)

        self._call(log)
        self.dead = False  # one trial's failure (warned) does not silence the next


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class _MLflowFold(Guarded):
    def __init__(self, tracker: MLflowTracker, task: str, method: str, fold: int) -> None:
        self.client, self.where = tracker.client, f"{tracker.where}, {method} fold {fold}"
        self.run_id: str | None = None

        def open_run() -> str:
            parent = tracker.parent(task, method)
            tags = {**run_tags(tracker.out, task, method, "fold", fold), "mlflow.parentRunId": parent}
            return self.client.create_run(
                tracker.experiment(task), tags=tags, run_name=f"fold_{fold}"
            ).info.run_id

        self.run_id = self._call(open_run)

    def _metrics(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in values.items()]
        self._call(lambda: self.client.log_batch(self.run_id, metrics=batch))

    def epoch(self, epoch: int, record: Mapping[str, Any]) -> None:
        self._metrics(numeric(record), epoch)

    def finish(self, config: Mapping[str, Any], hash_: str, metrics: Mapping[str, Any], folder: Path) -> None:
        from mlflow.entities import Param, RunTag

        params = [Param(k, v) for k, v in flatten({"config_hash": hash_, **config}).items()]
        for chunk in _chunks(params, MAX_PARAMS):
            self._call(lambda chunk=chunk: self.client.log_batch(self.run_id, params=chunk))
        self._call(lambda: self.client.log_batch(self.run_id, tags=[RunTag("bench.config_hash", hash_)]))
        self._metrics(final_metrics(metrics), int(metrics.get("best_epoch", 0)))
        for path in fold_files(folder):
            self._call(lambda path=path: self.client.log_artifact(self.run_id, str(path)))

    def close(self, ok: bool) -> None:
        if self.run_id is not None:
            self.dead = False  # end the run even when a log call failed
            self._call(lambda: self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED"))
