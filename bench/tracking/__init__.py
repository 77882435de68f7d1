"""Experiment tracking, opt-in (this package: the options and :func:`open_tracker`; base: the interface
and what is logged; mlflow_store, tensorboard_store: the two backends): each fold's run logged to MLflow or TensorBoard as it trains.

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

``bench sweep`` logs each finished trial of each outer fold's search too (the overrides it tried, its mean
and per-inner-fold validation AUC, its Optuna state), then ``M[best]``'s folds as above.

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
from pathlib import Path

from ..config import Tracking
from ..errors import BenchError
from .base import NULL_TRACKER, TrackedFold, Tracker

__all__ = ["NULL_TRACKER", "TrackedFold", "Tracker", "open_tracker", "resolve_tracking", "tracking_spec"]

_PACKAGES = {"mlflow": "mlflow", "tensorboard": "tensorboard"}


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


def open_tracker(spec: Tracking | None, out: Path) -> Tracker:
    """The tracker of a resolved spec (:func:`resolve_tracking`); :data:`NULL_TRACKER` when None."""
    if spec is None:
        return NULL_TRACKER
    if spec.backend == "mlflow":
        from .mlflow_store import MLflowTracker

        return MLflowTracker(str(spec.uri), out)
    from .tensorboard_store import TensorBoardTracker

    return TensorBoardTracker(Path(str(spec.uri)))
