"""Task definitions: the YAML of the contract, validated (typos are errors), paths resolved."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

from .errors import BenchError
from .names import unsafe_reason

__all__ = [
    "ExternalCohort",
    "OmicsSelect",
    "TaskConfig",
    "Tracking",
    "builtin_task_dir",
    "cache_root",
    "list_builtin_tasks",
    "read_task",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _file_name(value: str) -> str:
    """A name bench uses as a folder name (task, cohort): refused when it could escape its folder."""
    reason = unsafe_reason(value)
    if reason:
        raise ValueError(f"{value!r} cannot be used as a folder name: {reason}")
    return value


FileName = Annotated[str, AfterValidator(_file_name)]

# A feature backbone's name: a folder under each method's results when a task has several, so it must not
# read as one of the folders bench itself puts there.
_BACKBONE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_RESERVED = re.compile(r"^(fold|repeat)_\d+$")


def _backbone_name(value: str) -> str:
    if not _BACKBONE.match(value) or _RESERVED.match(value):
        raise ValueError(
            f"{value!r} is not a usable feature-set name: use letters, digits, '_', '-', '.' "
            "(starting with a letter or digit), and not fold_<k> or repeat_<r>"
        )
    return value


#: ``features:``: one folder, or several feature sets (backbones) of the same slides, name -> folder
Features = Annotated[
    Annotated[Path, Tag("folder")]
    | Annotated[dict[Annotated[str, AfterValidator(_backbone_name)], Path], Tag("sets")],
    Discriminator(lambda v: "sets" if isinstance(v, dict) else "folder"),
]


class ExternalCohort(_Strict):
    """An external validation cohort: every fold's model is tested on it."""

    name: FileName = Field(description="cohort name, written in predictions.csv's 'cohort' column")
    labels: Path | None = Field(None, description="labels CSV (case_id, slide_id, <label_col>)")
    features: Features | None = Field(
        None, description="folder of <slide_id>.h5 / .pt feature files, or name -> folder per backbone"
    )


class OmicsSelect(_Strict):
    """Gene selection, fit in each fold on that fold's training patients only (bench/data/genes.py)."""

    method: Literal["variance", "univariate", "gbdt"] = Field(
        description="variance of log-expression (unsupervised); univariate ANOVA F against the label; "
        "gbdt: impurity importance of a gradient-boosted tree model (the authors' XGBoost settings)"
    )
    k: int = Field(768, ge=1, description="genes kept (the MoMKD authors keep 768)")


class Tracking(_Strict):
    """Where each fold's run is logged (bench/tracking.py); ``--track`` on the command line wins over it."""

    backend: Literal["mlflow", "tensorboard", "none"] = Field(
        description="mlflow | tensorboard | none (none: a task's tracking switched off)"
    )
    uri: str | None = Field(
        None,
        description="MLflow tracking URI (http(s)://, sqlite:///, ...) or a folder (MLflow: a local store in "
        "it; TensorBoard: the log folder); default: <out>/mlruns or <out>/tensorboard",
    )


class TaskConfig(_Strict):
    """One prediction task (the contract's task YAML)."""

    name: FileName
    label_col: str
    positive: list[str] = Field(min_length=1, description="label values counted as the positive class")
    negative: list[str] | None = Field(
        None, description="label values counted as negative; other values are errors (default: the rest)"
    )
    labels: Path | None = None
    features: Features | None = Field(
        None,
        description="folder of <slide_id>.h5 / .pt feature files, or several feature sets of the same "
        "slides (backbones) as name -> folder: every method runs on each",
    )
    omics: Path | None = Field(
        None, description="optional CSV: case_id + one column per gene (train-time only)"
    )
    omics_log1p: bool = Field(True, description="apply log2(x + 1) to the omics before z-scoring")
    omics_select: OmicsSelect | None = Field(
        None, description="per-fold gene selection on the training patients (default: every gene given)"
    )
    omics_groups: Path | None = Field(
        None, description="optional CSV gene,group for methods with gene groups"
    )
    require_omics: bool = Field(
        False, description="drop training patients without omics (default: keep them)"
    )
    folds: int = Field(5, ge=2)
    seed: int = 0
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="validation patients carved from each training part"
    )
    splits: Path | None = Field(
        None, description="a Patho-Bench splits TSV or a folder of CLAM splits_{k}.csv"
    )
    split_by: Literal["patient", "site"] = Field(
        "patient",
        description="group the patients of the splits bench makes by patient, or by tissue source site",
    )
    site_col: str | None = Field(
        None,
        description="column of the labels CSV naming each patient's site (split_by: site); default: the "
        "site code of TCGA barcodes, the two characters after 'TCGA-' in case_id",
    )
    patient_aggregation: Literal["mean", "max"] = "mean"
    external: list[ExternalCohort] = Field(default_factory=list)
    train: dict[str, Any] = Field(
        default_factory=dict,
        description="overrides of every method's training settings (epochs, patience, ...)",
    )
    tracking: Tracking | None = Field(
        None, description="log every fold to MLflow or TensorBoard (results never change with it)"
    )
    source: Literal["files", "synthetic"] = "files"
    synthetic: dict[str, Any] | None = Field(None, description="generator settings when source is synthetic")
    path: Path | None = Field(None, description="the YAML file this task was read from (set by the loader)")

    @model_validator(mode="after")
    def _files_given(self) -> TaskConfig:
        if self.source == "files":
            missing = [k for k in ("labels", "features") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"'{' and '.join(missing)}' must be given when source is 'files'")
            for ext in self.external:
                if ext.labels is None or ext.features is None:
                    raise ValueError(f"external cohort {ext.name!r} needs 'labels' and 'features'")
        if self.omics_select is not None and self.source == "files" and self.omics is None:
            raise ValueError("'omics_select' needs an 'omics' file to select genes from")
        if self.split_by == "site" and self.splits is not None:
            raise ValueError(
                "'split_by: site' makes the splits and 'splits' imports them: give one of the two"
            )
        if self.site_col is not None and self.split_by != "site":
            raise ValueError("'site_col' is read only with 'split_by: site'")
        names = [e.name for e in self.external]
        if len(set(names)) != len(names) or "test" in names:
            raise ValueError("external cohort names must be unique and must not be 'test'")
        self._check_backbones()
        return self

    def _check_backbones(self) -> None:
        """Every cohort gives the same feature sets: one folder each, or a mapping with the same names."""
        if isinstance(self.features, dict) and not self.features:
            raise ValueError("'features' is an empty mapping: give a folder, or name -> folder")
        sets = self.feature_sets
        for ext in self.external:
            theirs = sorted(ext.features) if isinstance(ext.features, dict) else []
            if ext.features is not None and self.features is not None and theirs != sorted(sets):
                want = f"a mapping with the feature sets {sets}" if sets else "one folder, as the task does"
                raise ValueError(f"external cohort {ext.name!r} must give 'features' as {want}")

    @property
    def feature_sets(self) -> list[str]:
        """The names of the task's feature sets in the order given; empty when ``features`` is one folder."""
        return list(self.features) if isinstance(self.features, dict) else []

    def with_features(self, name: str | None) -> TaskConfig:
        """The task on one feature set: ``features`` (internal and external) the folder of ``name`` (None:
        the only one there is). An unknown name, or None on a task with several, is a ``BenchError``."""
        sets = self.feature_sets
        if name is None and len(sets) <= 1:
            name = sets[0] if sets else None
        if name is None and not sets:
            return self
        if name not in sets:
            given = f"its feature sets are {', '.join(sets)}" if sets else "it has one features folder"
            raise BenchError(f"{self.path}: no feature set {name!r} in task {self.name!r}: {given}.")

        def pick(features: Features | None) -> Path | None:
            return features[name] if isinstance(features, dict) else features

        return self.model_copy(
            update={
                "features": pick(self.features),
                "external": [e.model_copy(update={"features": pick(e.features)}) for e in self.external],
            }
        )


def builtin_task_dir() -> Path:
    """The repository's ``datasets/`` folder of built-in task YAMLs."""
    return Path(__file__).resolve().parents[1] / "datasets"


def list_builtin_tasks() -> list[Path]:
    return sorted(builtin_task_dir().glob("*.yaml"))


def cache_root() -> Path:
    """Where generated synthetic cohorts and graph caches live (``$BENCH_CACHE``, else ~/.cache/bench)."""
    return Path(os.environ.get("BENCH_CACHE", Path.home() / ".cache" / "bench"))


def _resolve(base: Path, p: Path | None) -> Path | None:
    if p is None:
        return None
    p = Path(os.path.expanduser(str(p)))
    return p if p.is_absolute() else (base / p).resolve()


def _resolve_features(base: Path, features: Features | None) -> Features | None:
    if isinstance(features, dict):
        return {name: _resolve(base, p) for name, p in features.items()}
    return _resolve(base, features)


def read_task(task: str | Path) -> TaskConfig:
    """Read a task by built-in name (``odx``) or YAML path; relative paths resolve against the YAML's folder.

    A synthetic task comes back without files: ``bench.data.task.load_task`` generates them.
    """
    path = Path(task)
    if not path.suffix and not path.exists():
        path = builtin_task_dir() / f"{task}.yaml"
        if not path.is_file():
            names = ", ".join(p.stem for p in list_builtin_tasks())
            raise BenchError(f"unknown task {task!r}: not a file and not a built-in task ({names}).")
    if not path.is_file():
        raise BenchError(
            f"{path}: task file not found. Give a built-in task name or the path of a task YAML."
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise BenchError(f"{path}: not valid YAML ({exc}).") from exc
    if not isinstance(raw, dict):
        raise BenchError(f"{path}: a task YAML must be a mapping of settings.")
    base = path.resolve().parent
    try:
        cfg = TaskConfig(**raw, path=path.resolve())
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'task'}: {e['msg']}" for e in exc.errors())
        raise BenchError(f"{path}: invalid task definition ({problems}). See README 'Task format'.") from exc
    if cfg.tracking is not None and cfg.tracking.uri and "://" not in cfg.tracking.uri:
        folder = str(_resolve(base, Path(cfg.tracking.uri)))
        cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": folder})})
    if cfg.source == "synthetic":
        return cfg
    return cfg.model_copy(
        update={
            "labels": _resolve(base, cfg.labels),
            "features": _resolve_features(base, cfg.features),
            "omics": _resolve(base, cfg.omics),
            "omics_groups": _resolve(base, cfg.omics_groups),
            "splits": _resolve(base, cfg.splits),
            "external": [
                e.model_copy(
                    update={
                        "labels": _resolve(base, e.labels),
                        "features": _resolve_features(base, e.features),
                    }
                )
                for e in cfg.external
            ],
        }
    )
