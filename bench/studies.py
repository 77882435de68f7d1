"""Where the studies of ``bench sweep`` live: storages (SQLite, any Optuna RDB URL, journal files), one study
per outer fold recording the patients it searched, and their finished trials (bench/sweep.py explains the
design)."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import BenchError
from .redact import redact, remember

__all__ = ["complete_by_fold", "complete_trials", "make_storage", "open_study", "storage_url", "study_name"]


def study_name(name: str | None, task: str, method: str, fold: int) -> str:
    """The study of outer fold ``fold``'s search (``name`` None: ``<task>-<method>``)."""
    return f"{name or f'{task}-{method}'}-fold{fold}"


def storage_url(spec: str | None, out: Path, task: str, method: str) -> str:
    """The studies' storage as a string workers can rebuild it from (paths made absolute); its password, if
    any, is remembered so that no later message of this process shows it."""
    remember(spec)
    if spec is None:
        path = (Path(out) / task / "sweeps" / f"{method}.db").resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    if spec.startswith("journal:") or spec.endswith(".journal"):
        return "journal:" + str(Path(spec.removeprefix("journal:")).expanduser().resolve())
    if spec.startswith(("postgresql://", "postgres://")):  # psycopg 3 whatever SQLAlchemy's default driver
        return "postgresql+psycopg://" + spec.split("://", 1)[1]
    if "://" not in spec:
        raise BenchError(
            f"--storage {redact(spec)!r}: give an Optuna storage URL (sqlite:///path.db, postgresql://user:pw@host/db, "
            "mysql://...) or a journal file (journal:<path> or a path ending in .journal)."
        )
    return spec


def make_storage(url: str) -> Any:
    """An Optuna storage for ``url``: a journal file, or an RDB with heartbeats (a dead worker's trial is
    marked failed after two missed minutes and retried up to twice)."""
    import optuna

    remember(url)
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    # Workers started together on a fresh database race to create Optuna's schema; the losers' attempt
    # fails on a duplicate object and succeeds when retried, so a few attempts are made before giving up.
    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    heartbeat_interval=60,
                    grace_period=120,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=2
                    ),
                )
        except ImportError as exc:
            raise BenchError(
                f"--storage {redact(url)}: its database driver is not installed ({redact(str(exc))}). For "
                "PostgreSQL: pip install -e '.[postgres]'."
            ) from None
        except Exception as exc:  # sqlalchemy's connection, URL and schema-creation errors
            if attempt == 2:
                raise BenchError(
                    f"--storage {redact(url)}: cannot open the study storage ({redact(str(exc))})."
                ) from None
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def open_study(storage: Any, name: str, seed: int, trials: int, pruning: bool, design: dict[str, Any]) -> Any:
    """Open (or create) one outer fold's study; ``design`` (which patients it searches, how) is recorded on
    the study, and a study recorded with another design is refused: its trials scored other patients."""
    import optuna

    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, trials // 2)))
    pruner = optuna.pruners.MedianPruner(n_warmup_steps=1) if pruning else optuna.pruners.NopPruner()
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=sampler,
        pruner=pruner,
        direction="maximize",
        load_if_exists=True,
    )
    recorded = study.user_attrs.get("search")
    if recorded is None:
        study.set_user_attr("search", design)
    elif recorded != design:
        raise BenchError(
            f"study {name!r} was searched with {recorded}, not {design} (another --folds, --seed, splits "
            "file or --inner-folds), so its trials scored other patients. Give another --study-name, or the "
            "settings it was run with."
        )
    return study


def complete_trials(study: Any) -> list[Any]:
    import optuna

    return [
        t
        for t in study.trials
        if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None and not math.isnan(t.value)
    ]


def complete_by_fold(studies: Mapping[int, Any], method: str) -> dict[int, list[Any]]:
    """Each outer fold's complete trials, best first; an error naming the folds that have none."""
    complete = {
        k: sorted(complete_trials(study), key=lambda t: -t.value) for k, study in sorted(studies.items())
    }
    missing = [k for k, trials in complete.items() if not trials]
    if not complete or missing:
        raise BenchError(
            f"the sweep of {method!r} has no complete trial on outer fold(s) {missing or 'any'} yet (all pruned "
            "or failed?); run more trials."
        )
    return complete
