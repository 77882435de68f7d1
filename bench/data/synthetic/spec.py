"""The generator's settings: :class:`SyntheticSpec` (the internal cohort and the world), :class:`ExternalSpec`
(each external cohort), their validation, and :func:`spec_hash`, the cache key of a cohort.

Every setting is checked when a spec is built, so a bad task YAML fails before anything is generated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from dataclasses import dataclass
from typing import Any

__all__ = [
    "GENERATOR_VERSION",
    "HELDOUT",
    "PROGRAMS",
    "BackboneSpec",
    "ExternalSpec",
    "SyntheticSpec",
    "spec_hash",
]

#: bump whenever a change alters generated files: it is part of the cache key.
GENERATOR_VERSION = 2

#: latent molecular programs, in the column order of ``latent.csv``.
PROGRAMS = ("erbb2", "luminal", "proliferation", "immune", "stromal", "basal")
#: settings of the internal cohort's sites, left out of the cache key when there are none (``n_sites`` 0)
_SITE_SETTINGS = ("n_sites", "site_stain_scale", "site_latent_shift")
# An external cohort's name: its folder and its case-id prefix.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
#: the held-out cohort's name (its folder, and the cohort name a task's ``external:`` list gives it)
HELDOUT = "heldout"


def _known(cls: type, d: dict[str, Any], what: str) -> dict[str, Any]:
    """``d`` as keyword arguments of ``cls``; unknown keys raise a ValueError that lists the valid ones."""
    if not isinstance(d, dict):
        raise ValueError(f"{what} settings must be a mapping, got {d!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"unknown {what} setting(s) {unknown}; valid: {', '.join(names)}")
    return dict(d)


def _check(spec: SyntheticSpec | ExternalSpec) -> None:
    """Types and the checks shared by both specs (sizes positive, bag range ordered)."""
    hints = typing.get_type_hints(type(spec))
    for f in dataclasses.fields(spec):
        value, hint = getattr(spec, f.name), hints[f.name]
        if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{f.name} must be an integer, got {value!r}")
        if hint is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{f.name} must be a number, got {value!r}")
            object.__setattr__(spec, f.name, float(value))
    for name in ("n_patients", "n_genes", "feature_dim", "bag_min"):
        if getattr(spec, name, 1) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(spec, name)}")
    if spec.bag_max < spec.bag_min:
        raise ValueError(f"bag_max ({spec.bag_max}) must be >= bag_min ({spec.bag_min})")


def _check_non_negative(
    spec: SyntheticSpec | ExternalSpec | BackboneSpec, names: tuple[str, ...], of: str = ""
) -> None:
    """Each setting in ``names`` is >= 0; ``of`` names the cohort in the message (e.g. ``" of 'site_b'"``)."""
    for name in names:
        if getattr(spec, name) < 0:
            raise ValueError(f"{name}{of} must be >= 0, got {getattr(spec, name)}")


@dataclass(frozen=True)
class ExternalSpec:
    """One external cohort: other patients, shifted biology and a scanner/stain-like feature shift.

    Attributes:
        name: folder name and case-id prefix (``<NAME>-0001``); not ``internal``.
        n_patients: number of patients (one slide each, a second for ``second_slide_fraction`` of them).
        bag_min, bag_max: bag sizes are log-uniform in this range (patches).
        latent_shift: mean of the latent programs, one value per :data:`PROGRAMS` entry; the default
            (more ERBB2 and proliferation, less luminal) raises HER2 and ODX high-risk, lowers PR prevalence.
        feature_shift: strength of the affine feature map ``x -> s ⊙ (M x) + o`` (0 = none): log channel
            scales ``~ N(0, (0.2 f)^2)``, offsets ``~ N(0, (0.5 f)^2)``, mixing ``M = I + 0.2 f G / sqrt(D)``.
        stain_scale: per-dimension sd of the slide-level stain offsets, along this site's own directions
            (a new scanner brings slide-to-slide variation the internal data never showed).
    """

    name: str = "external"
    n_patients: int = 150
    bag_min: int = 50
    bag_max: int = 400
    latent_shift: tuple[float, ...] = (0.3, -0.3, 0.3, 0.0, 0.0, 0.0)
    feature_shift: float = 2.0
    stain_scale: float = 1.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "latent_shift", tuple(float(v) for v in self.latent_shift))
        _check(self)
        if not _NAME.match(self.name) or self.name in ("internal", HELDOUT):
            raise ValueError(
                f"external cohort name {self.name!r} must be letters, digits, '_' or '-' and not 'internal' "
                f"or {HELDOUT!r}"
            )
        if len(self.latent_shift) != len(PROGRAMS):
            raise ValueError(
                f"latent_shift of {self.name!r} needs {len(PROGRAMS)} values ({', '.join(PROGRAMS)}), "
                f"got {len(self.latent_shift)}"
            )
        _check_non_negative(self, ("feature_shift", "stain_scale"), of=f" of {self.name!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExternalSpec:
        return cls(**_known(cls, d, "external cohort"))


@dataclass(frozen=True)
class BackboneSpec:
    """Another feature extractor looking at the same patches (a second foundation model): its own feature
    width, noise and view of the programs, its own prototypes, stain and program directions.

    Attributes:
        name: the feature set's name in the task (``features_<name>/`` beside ``features/`` in each cohort).
        feature_dim, noise_scale, signal_strength, program_visibility: as :class:`SyntheticSpec`'s, for this
            extractor (program_visibility None: the main extractor's).
    """

    name: str
    feature_dim: int = 256
    noise_scale: float = 1.0
    signal_strength: float = 2.0
    program_visibility: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"backbone name {self.name!r} must be letters, digits, '_' or '-'")
        if self.program_visibility is not None:
            object.__setattr__(self, "program_visibility", tuple(float(v) for v in self.program_visibility))
            if len(self.program_visibility) != len(PROGRAMS) or min(self.program_visibility) < 0:
                raise ValueError(
                    f"program_visibility of backbone {self.name!r} needs {len(PROGRAMS)} values >= 0"
                )
        if self.feature_dim < 1:
            raise ValueError(f"feature_dim of backbone {self.name!r} must be >= 1, got {self.feature_dim}")
        _check_non_negative(self, ("noise_scale", "signal_strength"), of=f" of backbone {self.name!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneSpec:
        return cls(**_known(cls, d, "backbone"))


@dataclass(frozen=True)
class SyntheticSpec:
    """Every setting of the generator; the defaults are the built-in tasks' data.

    Attributes:
        seed: seeds every draw (the world: prototypes, gene parameters, shifts; and each patient and slide).
        n_patients: internal patients.
        n_genes: omics width (768, as the gene set of MoMKD).
        feature_dim: patch feature width D.
        bag_min, bag_max: internal bag sizes, log-uniform in this range (patches).
        second_slide_fraction: share of patients with a second slide (a new layout of the same tumour).
        omics_fraction: share of internal patients with an omics row (missing completely at random).
        prevalence_her2, prevalence_pr, prevalence_odx: internal population prevalence of the positive class.
        label_noise: sd of the label-score noise relative to the sd of its latent part (caps any predictor's
            AUC: ~0.96 at 0.4).
        gene_loading: log-fold change per program SD of a gene on its primary program.
        gene_dispersion: median negative-binomial dispersion (variance = mean + dispersion · mean²).
        signal_strength: per-patch amplitude of the program projection ``U (v ⊙ z)`` in a fully relevant patch,
            in units of the isotropic noise sd; the WSI signal knob.
        program_visibility: ``v``, how visible each program is in H&E, one value per :data:`PROGRAMS` entry
            (proliferation most: mitoses and grade; ERBB2 amplification least).
        max_informative_fraction: cap on the share of a bag's patches that carry the signal.
        noise_scale: per-dimension sd of isotropic patch noise.
        structure_scale: per-dimension sd of the spatially smooth, tissue-specific low-rank structure.
        stain_scale: per-dimension sd of the slide-level stain/batch offset.
        feature_dtype: ``float16`` (half the disk) or ``float32``.
        heldout: patients of the held-out cohort ``heldout`` (0: none): more patients of the internal
            distribution (the same latent programs, scanner, stain, bag sizes and sites, with omics), drawn from
            streams of their own. A task lists it under ``external:`` like any external cohort, so every fold's
            model predicts it after training and it is never used to train, stop, threshold or select; with many
            patients its AUCs vary little between folds (the built-in tasks use 2,000).
        external: the external cohorts.
        n_sites: tissue source sites of the internal cohort (0, the default: none, and the three settings below
            are left out of the cache key and ``spec.json``, so cohorts made before sites existed keep their
            files and hashes). Each patient belongs to one site (Dirichlet(2) site sizes), written in the
            ``site`` column of ``labels.csv``.
        site_stain_scale: per-dimension sd of each site's constant feature offset ``N(0, σ² I_D)``, added to
            every patch of its slides: a site's stain and scanner signature.
        site_latent_shift: sd of each site's shift of the latent program means ``N(0, σ² I_K)``: sites differ in
            case mix, so in prevalence, which a model can exploit through the site signature when a site is on
            both sides of a split (Howard et al., Nature Communications 2021).
        backbones: further feature sets of the same patches (:class:`BackboneSpec`), each in
            ``features_<name>/``; with any, the task reads the feature sets ``{backbone: features/, <name>:
            features_<name>/, ...}``. Empty (the default): one feature set, and ``backbone`` and ``backbones``
            are left out of the cache key and ``spec.json``.
        backbone: the name of the main feature set (``features/``) when there are ``backbones``.
    """

    seed: int = 0
    n_patients: int = 1000
    n_genes: int = 768
    feature_dim: int = 128
    bag_min: int = 100
    bag_max: int = 600
    second_slide_fraction: float = 0.10
    omics_fraction: float = 0.85
    prevalence_her2: float = 0.20
    prevalence_pr: float = 0.65
    prevalence_odx: float = 0.25
    label_noise: float = 0.35
    gene_loading: float = 0.6
    gene_dispersion: float = 0.2
    signal_strength: float = 1.0
    program_visibility: tuple[float, ...] = (0.85, 0.9, 1.2, 1.0, 1.0, 1.0)
    max_informative_fraction: float = 0.20
    noise_scale: float = 1.0
    structure_scale: float = 1.0
    stain_scale: float = 0.3
    feature_dtype: str = "float16"
    heldout: int = 0
    external: tuple[ExternalSpec, ...] = (ExternalSpec(),)
    n_sites: int = 0
    site_stain_scale: float = 0.5
    site_latent_shift: float = 0.5
    backbones: tuple[BackboneSpec, ...] = ()
    backbone: str = "main"

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "external",
            tuple(e if isinstance(e, ExternalSpec) else ExternalSpec.from_dict(e) for e in self.external),
        )
        object.__setattr__(
            self,
            "backbones",
            tuple(b if isinstance(b, BackboneSpec) else BackboneSpec.from_dict(b) for b in self.backbones),
        )
        names = [self.backbone, *(b.name for b in self.backbones)]
        if len(set(names)) != len(names) or not _NAME.match(self.backbone):
            raise ValueError(f"backbone names must be unique letters, digits, '_' or '-', got {names}")
        object.__setattr__(self, "program_visibility", tuple(float(v) for v in self.program_visibility))
        _check(self)
        if len(self.program_visibility) != len(PROGRAMS) or min(self.program_visibility) < 0:
            raise ValueError(
                f"program_visibility needs {len(PROGRAMS)} values >= 0 ({', '.join(PROGRAMS)}), "
                f"got {self.program_visibility}"
            )
        for name in ("second_slide_fraction", "omics_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("prevalence_her2", "prevalence_pr", "prevalence_odx", "max_informative_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        _check_non_negative(
            self,
            (
                "label_noise",
                "gene_loading",
                "gene_dispersion",
                "signal_strength",
                "noise_scale",
                "structure_scale",
                "stain_scale",
                "n_sites",
                "heldout",
                "site_stain_scale",
                "site_latent_shift",
            ),
        )
        if self.gene_dispersion <= 0:
            raise ValueError(f"gene_dispersion must be > 0, got {self.gene_dispersion}")
        if self.feature_dtype not in ("float16", "float32"):
            raise ValueError(f"feature_dtype must be 'float16' or 'float32', got {self.feature_dtype!r}")
        names = [e.name for e in self.external]
        if len(set(names)) != len(names):
            raise ValueError(f"external cohort names must be unique, got {names}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SyntheticSpec:
        """Build from a plain mapping (a task YAML's generator settings); unknown keys are an error."""
        kwargs = _known(cls, d, "synthetic")
        for key in ("external", "backbones"):
            if key in kwargs and not isinstance(kwargs[key], list | tuple):
                raise ValueError(f"synthetic setting {key!r} must be a list, got {kwargs[key]!r}")
        return cls(**kwargs)  # ``__post_init__`` builds each external cohort

    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings (the cache key and ``spec.json``)."""
        d = dataclasses.asdict(self)
        d["program_visibility"] = list(self.program_visibility)
        d["external"] = [dict(e, latent_shift=list(e["latent_shift"])) for e in d["external"]]
        if not self.n_sites:
            for name in _SITE_SETTINGS:
                d.pop(name)
        if self.backbones:
            d["backbones"] = [
                dict(b, program_visibility=None if v is None else list(v))
                for b, v in zip(d["backbones"], (b.program_visibility for b in self.backbones), strict=True)
            ]
        else:
            del d["backbones"], d["backbone"]
        return d

    def feature_sets(self) -> dict[str, str]:
        """Feature-set name -> its folder in each cohort (empty with one feature set: the task's plain path)."""
        if not self.backbones:
            return {}
        return {self.backbone: "features", **{b.name: f"features_{b.name}" for b in self.backbones}}

    def for_backbone(self, b: BackboneSpec) -> SyntheticSpec:
        """This spec with ``b``'s feature settings: what the generator draws ``b``'s features with."""
        visibility = self.program_visibility if b.program_visibility is None else b.program_visibility
        return dataclasses.replace(
            self,
            feature_dim=b.feature_dim,
            noise_scale=b.noise_scale,
            signal_strength=b.signal_strength,
            program_visibility=visibility,
            backbones=(),
        )

    @property
    def prevalences(self) -> dict[str, float]:
        """Positive-class prevalence per label column."""
        return {"her2": self.prevalence_her2, "pr": self.prevalence_pr, "odx_risk": self.prevalence_odx}


def spec_hash(spec: SyntheticSpec) -> str:
    """Cache key: a hash of the settings and :data:`GENERATOR_VERSION`."""
    blob = json.dumps({"version": GENERATOR_VERSION, "spec": spec.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
