"""Where does a trained model look? Patch maps of one slide, and the localisation AUC on synthetic data.

``bench explain M --task T --slide S`` loads the weights a fold of ``bench run`` kept (``model.pt``), predicts the
slide from its H&E features alone, and draws its patches at their coordinates coloured by:

- the method's patch attention (``MILOutput.attention``), as a percentile rank within the slide (softmax
  attention spans orders of magnitude; ranks show where the top patches are, as CLAM's heatmaps do);
- every further map the method offers through ``MILMethod.explain_maps`` (MoMKD: the class memory and the
  memory component nearest to each patch), categorical maps coloured by class;
- the ground-truth relevance of each patch when the feature file stores it (synthetic cohorts: ``relevance``).

The localisation AUC of a slide is the AUC of attention against ``relevance > 0`` (patches that carry the
label signal): 0.5 is chance, 1 means every signal patch gets more attention than every other patch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from sklearn.metrics import roc_auc_score

from methods import create_method, get_method_class
from methods.base import MILMethod, PatchMap

from .csvio import read_table
from .data.cohort import graph_settings, read_slide_cached, slide_bag
from .data.formats import feature_path
from .device import resolve_device
from .errors import BenchError
from .figures import PatchPanel, explain_figure
from .store import MODEL_FILE, TaskResults, fold_dir, iter_fold_dirs, read_saved_splits

__all__ = [
    "SlideExplanation",
    "explain_slide",
    "figure_for",
    "load_fold_model",
    "localisation_auc",
    "localisation_table",
]


@dataclass
class SlideExplanation:
    """A slide as one fold's model sees it.

    Attributes:
        coords: grid coordinates ``(N, 2)``.
        attention: patch attention ``(N,)``.
        relevance: ground-truth patch relevance ``(N,)``, or None (real data).
        maps: the method's further per-patch maps (``MILMethod.explain_maps``), by title.
        part: where the slide was in that fold: ``test``, ``train``, ``val`` or the external cohort's name.
    """

    method: str
    task: str
    fold: int
    slide_id: str
    case_id: str
    label: int
    prob: float
    part: str
    coords: np.ndarray
    attention: np.ndarray
    relevance: np.ndarray | None
    maps: dict[str, PatchMap]

    @property
    def localisation_auc(self) -> float:
        return localisation_auc(self.attention, self.relevance)


def localisation_auc(attention: np.ndarray, relevance: np.ndarray | None) -> float:
    """AUC of attention against ``relevance > 0``; NaN without relevance or when one class is empty."""
    if relevance is None:
        return float("nan")
    truth = np.asarray(relevance) > 0
    if truth.all() or not truth.any():
        return float("nan")
    return float(roc_auc_score(truth, attention))


def _read_config(path: Path) -> dict[str, Any]:
    if not (path / "config.yaml").is_file():
        raise BenchError(f"{path}: no finished fold here. Run `bench run` for this method and task first.")
    return yaml.safe_load((path / "config.yaml").read_text()) or {}


def load_fold_model(
    path: Path, device: torch.device, untrained_seed: int | None = None
) -> tuple[MILMethod, dict[str, Any]]:
    """The model a fold kept (its ``model.pt``), built from the fold's ``config.yaml``, in eval mode.

    With ``untrained_seed`` the same architecture is returned at its random initialisation (torch seeded with
    it; no ``prepare`` step): the baseline that says how much of a localisation AUC training earned.
    """
    config = _read_config(path)
    weights = path / MODEL_FILE
    if not weights.is_file():
        raise BenchError(
            f"{path}: this fold has no {MODEL_FILE} (it was trained before `bench run` saved weights). "
            f"Delete the folder {path} and rerun `bench run` for this method to retrain it."
        )
    method = config["method"]
    cls = get_method_class(method)
    names = {f.name for f in dataclasses.fields(cls.cfg_class)}
    saved = {
        k: tuple(v) if isinstance(v, list) else v for k, v in config["method_config"].items() if k in names
    }
    cfg = cls.cfg_class(**saved)
    if untrained_seed is not None:
        torch.manual_seed(untrained_seed)
    model = create_method(method, in_dim=config["in_dim"], omics_dim=config.get("omics_dim"), cfg=cfg)
    if untrained_seed is None:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.to(device).eval(), config


def _locate_slide(config: dict[str, Any], slide_id: str) -> tuple[str, Path, str, int]:
    """(cohort, feature file, case_id, label) of ``slide_id`` in the cohorts the fold was run on."""
    task = config["task"]
    cohorts = [("internal", task.get("labels"), task.get("features"))]
    cohorts += [(e["name"], e.get("labels"), e.get("features")) for e in task.get("external", [])]
    positive = {str(v) for v in task.get("positive", [])}
    for name, labels, features in cohorts:
        if not labels or not Path(labels).is_file():
            continue
        df = read_table(labels, ids=None)
        row = df[df.slide_id == slide_id]
        if row.empty:
            continue
        path = feature_path(Path(features), slide_id)
        if path is None:
            raise BenchError(
                f"slide {slide_id!r} is listed in {labels} but has no feature file in {features}."
            )
        return name, path, str(row.case_id.iloc[0]), int(row[task["label_col"]].iloc[0] in positive)
    raise BenchError(
        f"slide {slide_id!r} is not in the labels of task {task.get('name')!r} (internal or external cohorts)."
    )


def _part(splits: pd.DataFrame | None, cohort: str, slide_id: str, fold: int) -> str:
    if cohort != "internal":
        return cohort
    if splits is not None and f"fold_{fold}" in splits.columns:
        row = splits[splits.slide_id == slide_id]
        if not row.empty:
            return str(row[f"fold_{fold}"].iloc[0])
    return "unknown"


def _test_fold(splits: pd.DataFrame | None, slide_id: str) -> int | None:
    """The fold whose test part holds ``slide_id``, or None."""
    if splits is None:
        return None
    row = splits[splits.slide_id == slide_id]
    for col in (c for c in splits.columns if c.startswith("fold_")):
        if not row.empty and row[col].iloc[0] == "test":
            return int(col.split("_")[1])
    return None


def _bag(path: Path, model: MILMethod, slide_id: str, case_id: str, label: int):
    """The slide's bag as the fold's model reads it (no omics), and its ground-truth relevance or None."""
    sf = read_slide_cached(path)
    if sf.coords is None:
        raise BenchError(f"{path}: the feature file has no coordinates, so its patches cannot be drawn.")
    bag = slide_bag(path, label, slide_id, case_id, graph_settings(model.cfg))
    relevance = sf.extras.get("relevance")
    return bag, None if relevance is None else np.asarray(relevance, dtype=np.float64)


@torch.inference_mode()
def _patch_maps(model: MILMethod, bag, device: torch.device) -> tuple[float, np.ndarray, dict[str, PatchMap]]:
    """P(positive), the patch attention and the method's further maps of one bag."""
    bag = bag.to(device)
    out = model(bag)
    if out.attention is None:
        raise BenchError(f"method {model.name!r} gives no patch attention, so there is nothing to draw.")
    maps = {
        title: dataclasses.replace(m, values=m.values.float().cpu())
        for title, m in model.explain_maps(bag, out).items()
    }
    return float(out.logits.float().softmax(-1)[1]), out.attention.float().cpu().numpy(), maps


def explain_slide(
    out: Path,
    task: str,
    method: str,
    slide_id: str,
    fold: int | None = None,
    device: str = "cpu",
    features: str | None = None,
) -> SlideExplanation:
    """Patch maps of ``slide_id`` under one fold's model of ``method`` (default: the fold that tested it) on
    feature set ``features`` (None: the task's only one)."""
    splits = read_saved_splits(out, task)
    if fold is None:
        fold = _test_fold(splits, slide_id)
    if fold is None:  # an external slide, or no splits on disk: the first fold with weights
        kept = [
            loc.fold
            for loc in iter_fold_dirs(out, task)
            if (loc.method, loc.features) == (method, features) and (loc.path / MODEL_FILE).is_file()
        ]
        fold = kept[0] if kept else 0
    dev = resolve_device(device)
    model, config = load_fold_model(fold_dir(out, task, method, fold, features), dev)
    cohort, path, case_id, label = _locate_slide(config, slide_id)
    bag, relevance = _bag(path, model, slide_id, case_id, label)
    prob, attention, maps = _patch_maps(model, bag, dev)
    return SlideExplanation(
        method=method,
        task=task,
        fold=fold,
        slide_id=slide_id,
        case_id=case_id,
        label=label,
        prob=prob,
        part=_part(splits, cohort, slide_id, fold),
        coords=bag.coords.numpy(),
        attention=attention,
        relevance=relevance,
        maps=maps,
    )


def _percentile(values: np.ndarray) -> np.ndarray:
    ranks = np.argsort(np.argsort(values, kind="stable"), kind="stable")
    return ranks / max(1, len(values) - 1)


def _panel(title: str, m: PatchMap) -> PatchPanel:
    """A method's map as a figure panel: continuous on a sequential map; categories coloured by class, each
    class in shades of its own colour (C− blues, C+ reds)."""
    import seaborn as sns

    values = m.values.numpy().astype(float)
    if m.categories is None:
        return PatchPanel(title, values, cmap="viridis", vmin=float(values.min()), vmax=float(values.max()))
    classes = m.classes or tuple(range(len(m.categories)))
    palettes = ("Blues_r", "Reds_r", "Greens_r", "Purples_r", "Oranges_r")
    colors: list[tuple] = [()] * len(m.categories)
    for c in sorted(set(classes)):
        members = [i for i, k in enumerate(classes) if k == c]
        shades = sns.color_palette(palettes[c % len(palettes)], len(members) + 1)
        for i, shade in zip(members, shades, strict=False):
            colors[i] = shade
    return PatchPanel(title, values, categories=list(m.categories), colors=colors)


def figure_for(ex: SlideExplanation):
    """The explain figure: attention (percentile), the method's further maps, ground truth."""
    panels = [PatchPanel("attention (percentile rank)", _percentile(ex.attention), cmap="magma")]
    panels += [_panel(title, m) for title, m in ex.maps.items()]
    if ex.relevance is not None:
        panels.append(PatchPanel("ground-truth relevance", ex.relevance, cmap="Greens"))
    truth = "positive" if ex.label == 1 else "negative"
    loc = ex.localisation_auc
    title = (
        f"{ex.method} · {ex.task} · {ex.slide_id} ({truth}) · fold {ex.fold} ({ex.part})\n"
        f"P(positive) = {ex.prob:.2f} · {len(ex.attention)} patches"
        + ("" if np.isnan(loc) else f" · localisation AUC {loc:.2f}")
    )
    return explain_figure(ex.coords, panels, title)


def localisation_table(
    results: TaskResults, n_slides: int = 12, seed: int = 0, device: str = "cpu"
) -> pd.DataFrame:
    """Mean localisation AUC over (a seeded sample of) each fold's test slides, per method and fold, for the
    trained model (``auc``) and for the same architecture untrained (``auc_untrained``, seeded per fold).

    Only folds with kept weights, methods with attention, and slides whose files store ``relevance`` count.
    Returns columns method, fold, slides, auc, auc_untrained (empty when the slides have no ground truth).
    """
    dev = resolve_device(device)
    columns = ["method", "fold", "slides", "auc", "auc_untrained"]
    rows = []
    for run in results.runs:
        if run.repeat or not (run.path / MODEL_FILE).is_file():  # the first repeat's folds, as explain draws
            continue
        pred = run.predictions
        slides = np.sort(pred.slide_id[pred.cohort == "test"].to_numpy())
        if len(slides) > n_slides:  # the same sample for every method of a fold
            slides = np.random.default_rng([seed, run.fold]).choice(slides, n_slides, replace=False)
        scored = _fold_localisation(run.path, slides, dev, seed * 1000 + run.fold)
        if scored is None:  # the slides carry no ground truth
            return pd.DataFrame(columns=columns)
        trained, untrained = scored
        valid = ~np.isnan(trained)
        if valid.any():
            rows.append(
                [
                    run.method,
                    run.fold,
                    int(valid.sum()),
                    float(np.mean(trained[valid])),
                    float(np.nanmean(untrained[valid])),
                ]
            )
    return pd.DataFrame(rows, columns=columns)


def _fold_localisation(
    path: Path, slides: np.ndarray, device: torch.device, untrained_seed: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Localisation AUCs of ``slides`` under a fold's kept model and its untrained twin; None when a slide
    has no relevance, empty arrays when the method gives no attention."""
    model, config = load_fold_model(path, device)
    untrained, _ = load_fold_model(path, device, untrained_seed=untrained_seed)
    trained_aucs, untrained_aucs = [], []
    for slide_id in slides:
        _, feature_file, case_id, label = _locate_slide(config, str(slide_id))
        bag, relevance = _bag(feature_file, model, str(slide_id), case_id, label)
        if relevance is None:
            return None
        try:
            trained_aucs.append(localisation_auc(_patch_maps(model, bag, device)[1], relevance))
        except BenchError:  # no attention: nothing to score for this method
            break
        untrained_aucs.append(localisation_auc(_patch_maps(untrained, bag, device)[1], relevance))
    return np.asarray(trained_aucs, dtype=float), np.asarray(untrained_aucs, dtype=float)
