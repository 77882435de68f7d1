"""Experiment tracking, opt-in: each fold's run logged to MLflow or TensorBoard as it trains.

``--track mlflow|tensorboard`` (or a task's ``tracking:`` block; the command line wins, ``--track none``
switches a task's off) makes every trained fold log, through :class:`Tracker`:

- the resolved configuration (``config.yaml``'s content, flattened to dotted keys) and its hash as
  parameters (MLflow's limits: keys cut to 250 characters, values to 6000, at most 100 per request);
- every epoch's record of the trainer's history (``train_loss``, ``val_auc``, ``val_loss``, the method's
  own terms) at step = epoch, while it trains;
- the final metrics per cohort (``<cohort>/<metric>``, ``@`` written ``_at_``: ``test/acc_at_0.5``) and
  ``best_epoch``, ``epochs_run``, ``train_seconds``;
- the fold folder's files as artefacts: predictions.csv, metrics.json, config.yaml and any figure there
  (not model.pt: the weights stay in ``--out``).

MLflow: one experiment per task (``bench/<task>``), one parent run per method, a nested run per fold
(``fold_<k>``), each tagged ``bench.task``, ``bench.method``, ``bench.fold``; the parent runs get the
summary's mean and SD over folds (``test/auc_mean``...) when ``bench run`` finishes. Default store: SQLite
at ``<out>/mlruns/mlflow.db`` with artefacts in ``<out>/mlruns/artifacts`` (MLflow's recommended backend
since 3.7; ``mlflow ui --backend-store-uri sqlite:///<out>/mlruns/mlflow.db``). TensorBoard: event files in
``<out>/tensorboard/<task>/<method>/fold_<k>/`` (scalars, the configuration as text and hparams, a PR curve
per cohort).

Tracking never changes results (it reads what the fold computed, after the fact or through the epoch hook)
and never stops a run: a failing store (unreachable server, locked database) is a warning and that fold
goes on untracked. An MLflow server's HTTP retries default here to 2 with a 20 s timeout
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_TIMEOUT``; set them to override), so an
unreachable server costs seconds, not MLflow's default minutes.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import yaml

from .config import Tracking
from .errors import BenchError, TrackingWarning
from .fsio import plain
from .store import FOLD_FILES

__all__ = [
    "NULL_TRACKER",
    "TrackedFold",
    "Tracker",
    "TrackingWarning",
    "open_tracker",
    "resolve_tracking",
    "tracking_spec",
]

FIGURES = ("*.png", "*.svg")  # a fold folder's figures, logged when present
MAX_KEY, MAX_VALUE, MAX_PARAMS = 250, 6000, 100  # MLflow's param key and value lengths, params per request
_PACKAGES = {"mlflow": "mlflow", "tensorboard": "tensorboard"}
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


# --------------------------------------------------------------------------------------------- the options


def tracking_spec(backend: str | None, uri: str | None) -> Tracking | None:
    """The ``--track``/``--track-uri`` options as a :class:`Tracking` (None: not given); checked."""
    if backend is None:
        if uri is not None:
            raise BenchError("--track-uri needs --track mlflow or --track tensorboard.")
        return None
    if backend not in (*_PACKAGES, "none"):
        raise BenchError(f"--track {backend!r}: choose mlflow, tensorboard or none.")
    spec = Tracking(backend=backend, uri=uri)
    _check_installed(spec)
    return spec


def resolve_tracking(given: Tracking | None, task: Tracking | None, out: Path) -> Tracking | None:
    """What a run tracks: the command line's choice, else the task's; None when off. The URI is made
    absolute (workers and Slurm array tasks run elsewhere): a folder becomes MLflow's SQLite store in it,
    and no URI means ``<out>/mlruns`` (MLflow) or ``<out>/tensorboard``."""
    spec = given if given is not None else task
    if spec is None or spec.backend == "none":
        return None
    _check_installed(spec)
    uri = spec.uri
    if uri is None:
        uri = str(Path(out).resolve() / ("mlruns" if spec.backend == "mlflow" else "tensorboard"))
    elif "://" not in uri:
        uri = str(Path(uri).expanduser().resolve())
    if spec.backend == "mlflow" and "://" not in uri:
        uri = f"sqlite:///{uri}/mlflow.db"
    return spec.model_copy(update={"uri": uri})


def _check_installed(spec: Tracking) -> None:
    package = _PACKAGES.get(spec.backend)
    if package is not None and importlib.util.find_spec(package) is None:
        raise BenchError(
            f"tracking with {spec.backend} needs the optional 'tracking' extra, which is not installed "
            f"({package} is missing). Install it with `pip install -e '.[tracking]'` from the repository "
            "root, or run without --track (and without a 'tracking:' block in the task)."
        )


# ------------------------------------------------------------------------------------------- the interface


class TrackedFold(Protocol):
    """One fold's run in the tracking store; none of its methods raises."""

    def epoch(self, epoch: int, record: Mapping[str, Any]) -> None:
        """Log one epoch's history record at step ``epoch``."""

    def finish(self, config: Mapping[str, Any], hash_: str, metrics: Mapping[str, Any], folder: Path) -> None:
        """Log the resolved configuration, its hash, the final metrics and the fold folder's files."""

    def close(self, ok: bool) -> None:
        """End the run (``ok`` False: the fold failed)."""


class Tracker(Protocol):
    """Where a task's folds are logged (:func:`open_tracker`)."""

    def start(self, task: str, methods: Sequence[str]) -> bool:
        """Prepare the store for these methods (once, before any job); False (warned) when it fails."""

    def fold(self, task: str, method: str, fold: int) -> TrackedFold:
        """Open fold ``fold``'s run of ``method``."""

    def summary(self, task: str, summary: Any) -> None:
        """Log summary.csv's rows (mean and SD over folds) on each method's run."""


class _NullFold:
    def epoch(self, epoch: int, record: Mapping[str, Any]) -> None:
        pass

    def finish(self, config: Mapping[str, Any], hash_: str, metrics: Mapping[str, Any], folder: Path) -> None:
        pass

    def close(self, ok: bool) -> None:
        pass


class _NullTracker:
    """No tracking: every call does nothing."""

    def start(self, task: str, methods: Sequence[str]) -> bool:
        return True

    def fold(self, task: str, method: str, fold: int) -> TrackedFold:
        return _NullFold()

    def summary(self, task: str, summary: Any) -> None:
        pass


NULL_TRACKER: Tracker = _NullTracker()


def open_tracker(spec: Tracking | None, out: Path) -> Tracker:
    """The tracker of a resolved spec (:func:`resolve_tracking`); :data:`NULL_TRACKER` when None."""
    if spec is None:
        return NULL_TRACKER
    if spec.backend == "mlflow":
        return _MLflowTracker(str(spec.uri), out)
    return _TensorBoardTracker(Path(str(spec.uri)))


def _warn(where: str, exc: BaseException) -> None:
    text = " ".join(str(exc).split())
    warnings.warn(
        f"tracking to {where} failed ({type(exc).__name__}: {text[:240]}{'…' if len(text) > 240 else ''}); "
        "the run goes on, not tracked there.",
        TrackingWarning,
        stacklevel=3,
    )


class _Guarded:
    """Calls into a tracking backend: the first failure warns and turns the rest off."""

    where = "tracking"
    dead = False

    def _call(self, fn: Callable[[], Any]) -> Any:
        if self.dead:
            return None
        try:
            return fn()
        except Exception as exc:
            self.dead = True
            _warn(self.where, exc)
            return None


# -------------------------------------------------------------------------------------------- what is logged


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested configuration -> ``{dotted.key: text}``; lists and tuples as JSON, values cut to MLflow's 6000
    characters (the full configuration is the config.yaml artefact)."""
    flat: dict[str, str] = {}
    for key, value in plain(dict(config)).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        flat[_key(name)[:MAX_KEY]] = text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 1] + "…"
    return flat


def _key(name: str) -> str:
    """A metric or parameter name MLflow accepts (letters, digits, ``_-. /``): ``acc@0.5`` -> ``acc_at_0.5``."""
    return re.sub(r"[^\w\-. /]", "_", name.replace("@", "_at_"))


def _numbers(record: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a history record (booleans and text left out), ``epoch`` excluded."""
    return {
        _key(k): float(v)
        for k, v in record.items()
        if k != "epoch" and isinstance(v, int | float) and not isinstance(v, bool)
    }


def final_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``<cohort>/<metric>`` of each cohort in metrics.json (``n`` included), and the fold's epoch facts."""
    flat = {
        _key(f"{cohort}/{name}"): float(value)
        for cohort, values in metrics.get("cohorts", {}).items()
        for name, value in values.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    for name in ("best_epoch", "epochs_run", "train_seconds"):
        if isinstance(metrics.get(name), int | float):
            flat[name] = float(metrics[name])
    return flat


def fold_files(folder: Path) -> list[Path]:
    """The files of a fold folder that are logged as artefacts: its three files and any figure."""
    files = [folder / f for f in FOLD_FILES if (folder / f).is_file()]
    return files + sorted(p for pattern in FIGURES for p in folder.glob(pattern))


def _tags(out: str, task: str, method: str, fold: int | None = None) -> dict[str, str]:
    tags = {
        "bench.task": task,
        "bench.method": method,
        "bench.level": "method" if fold is None else "fold",
        "bench.out": out,
    }
    if fold is not None:
        tags["bench.fold"] = str(fold)
    return tags


# -------------------------------------------------------------------------------------------------- MLflow


def _client(uri: str) -> Any:
    """An MlflowClient of ``uri``, MLflow's and Alembic's info lines silenced, short HTTP retries."""
    for var, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(var, value)
    from mlflow.tracking import MlflowClient

    for name in ("mlflow", "alembic", "urllib3.connectionpool"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return MlflowClient(tracking_uri=uri)


class _MLflowTracker(_Guarded):
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

    def parent(self, task: str, method: str) -> str:
        """The run id of ``method``'s parent run for this ``--out``, created (finished: a container) when
        there is none."""
        exp = self.experiment(task)
        runs = self.client.search_runs(
            [exp],
            filter_string=f"tags.`bench.level` = 'method' and tags.`bench.method` = '{method}'",
            order_by=["attributes.start_time ASC"],
            max_results=1000,
        )
        for run in runs:
            if run.data.tags.get("bench.out") == self.out:
                return run.info.run_id
        run = self.client.create_run(exp, tags=_tags(self.out, task, method), run_name=method)
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    def start(self, task: str, methods: Sequence[str]) -> bool:
        self._call(lambda: [self.parent(task, m) for m in methods])
        return not self.dead

    def fold(self, task: str, method: str, fold: int) -> TrackedFold:
        return _MLflowFold(self, task, method, fold)

    def summary(self, task: str, summary: Any) -> None:
        def log() -> None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            for method, rows in summary.groupby("method"):
                metrics = [
                    Metric(_key(f"{r.cohort}/{r.metric}_{stat}"), float(getattr(r, stat)), now, 0)
                    for r in rows.itertuples()
                    for stat in ("mean", "std")
                    if not math.isnan(float(getattr(r, stat)))
                ]
                run_id = self.parent(task, str(method))
                for chunk in _chunks(metrics, 1000):
                    self.client.log_batch(run_id, metrics=chunk)

        self._call(log)


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class _MLflowFold(_Guarded):
    def __init__(self, tracker: _MLflowTracker, task: str, method: str, fold: int) -> None:
        self.client, self.where = tracker.client, f"{tracker.where}, {method} fold {fold}"
        self.run_id: str | None = None

        def open_run() -> str:
            parent = tracker.parent(task, method)
            tags = {**_tags(tracker.out, task, method, fold), "mlflow.parentRunId": parent}
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
        self._metrics(_numbers(record), epoch)

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


# --------------------------------------------------------------------------------------------- TensorBoard


class _TensorBoardTracker:
    """Event files under ``<uri>/<task>/<method>/fold_<k>/``; TensorBoard has no runs to prepare."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def start(self, task: str, methods: Sequence[str]) -> bool:
        return True

    def fold(self, task: str, method: str, fold: int) -> TrackedFold:
        return _TensorBoardFold(self.root / task / method / f"fold_{fold}", f"tensorboard at {self.root}")

    def summary(self, task: str, summary: Any) -> None:
        pass


class _TensorBoardFold(_Guarded):
    def __init__(self, folder: Path, where: str) -> None:
        self.where = where
        self.writer = self._call(lambda: _summary_writer(folder))

    def epoch(self, epoch: int, record: Mapping[str, Any]) -> None:
        def log() -> None:
            for k, v in _numbers(record).items():
                self.writer.add_scalar(k, v, epoch)

        self._call(log)

    def finish(self, config: Mapping[str, Any], hash_: str, metrics: Mapping[str, Any], folder: Path) -> None:
        self._call(lambda: self._finish(config, hash_, metrics, folder))

    def _finish(
        self, config: Mapping[str, Any], hash_: str, metrics: Mapping[str, Any], folder: Path
    ) -> None:
        import numpy as np
        import pandas as pd

        step = int(metrics.get("best_epoch", 0))
        finals = final_metrics(metrics)
        for k, v in finals.items():
            self.writer.add_scalar(k, v, step)
        text = yaml.safe_dump(plain({"hash": hash_, **config}), sort_keys=False)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), step)
        params = flatten({"config_hash": hash_, **config})
        self.writer.add_hparams(params, {f"hparam/{k}": v for k, v in finals.items()}, run_name=".")
        predictions = folder / "predictions.csv"
        if predictions.is_file():
            pred = pd.read_csv(predictions)
            for cohort, rows in pred.groupby("cohort"):
                self.writer.add_pr_curve(
                    f"{cohort}/pr_curve", rows.label.to_numpy(), rows.prob.to_numpy(np.float64), step
                )
        for figure in (p for p in fold_files(folder) if p.suffix == ".png"):
            import matplotlib.image

            self.writer.add_image(figure.stem, matplotlib.image.imread(figure), step, dataformats="HWC")

    def close(self, ok: bool) -> None:
        if self.writer is not None:
            self.dead = False
            self._call(self.writer.close)


def _summary_writer(folder: Path) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(folder), flush_secs=30)
