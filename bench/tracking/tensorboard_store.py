"""The TensorBoard backend: event files per fold (torch's SummaryWriter; the ``tensorboard`` package)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..fsio import plain
from .base import Guarded, TrackedFold, Trial, final_metrics, flatten, fold_files, numeric

__all__ = ["TensorBoardTracker"]


class TensorBoardTracker(Guarded):
    """Event files under ``<uri>/<task>/<method>/fold_<k>/`` (a sweep's trials: ``<method>-sweep/``);
    TensorBoard has no runs to prepare."""

    def __init__(self, root: Path) -> None:
        self.root, self.where = root, f"tensorboard at {root}"

    def start(self, task: str, methods: Sequence[str], level: str = "method") -> bool:
        return True

    def fold(self, task: str, method: str, fold: int) -> TrackedFold:
        return _TensorBoardFold(self.root / task / method / f"fold_{fold}", self.where)

    def summary(self, task: str, summary: Any) -> None:
        pass

    def trial(self, task: str, method: str, fold: int, trial: Trial) -> None:
        """Each trial's overrides and scores as hparams (TensorBoard's HParams dashboard compares them)."""
        folder = self.root / task / f"{method}-sweep" / f"fold_{fold}"
        params = {
            k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in trial.params.items()
        }

        def log() -> None:
            writer = _summary_writer(folder)
            writer.add_hparams(params, trial.metrics(), run_name=f"trial_{trial.number}")
            writer.close()

        self._call(log)
        self.dead = False  # one trial's failure (warned) does not silence the next


class _TensorBoardFold(Guarded):
    def __init__(self, folder: Path, where: str) -> None:
        self.where = where
        self.writer = self._call(lambda: _summary_writer(folder))

    def epoch(self, epoch: int, record: Mapping[str, Any]) -> None:
        def log() -> None:
            for k, v in numeric(record).items():
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
