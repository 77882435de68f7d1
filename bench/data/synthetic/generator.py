"""Writing a synthetic TCGA-BRCA-like cohort from a spec: the world, scanners, patients, slide layouts, features.

One internal cohort carries all three labels (as TCGA-BRCA does), plus any number of external cohorts.
The generative model (full description and measured calibration in ``docs/synthetic.md``):

1. Each patient has six latent molecular programs ``z ~ N(shift, Σ)`` (:data:`PROGRAMS`, correlated as
   :data:`_PROGRAM_CORR` says). Each label is a thresholded noisy linear score ``w·z + e``, with
   ``sd(e) = label_noise · sd(w·z)`` and the threshold at the internal population quantile that gives the
   stated prevalence. External cohorts shift the latent mean, so the same rule gives other prevalences.
2. Omics (internal cohort, a fraction of patients): negative-binomial counts whose log-mean is a gene
   baseline spanning four orders of magnitude plus a gene loading on the programs plus a library-size term.
3. Slides (1 per patient, a second one for a fraction of patients): an irregular tissue mask on a patch grid
   cut into Voronoi regions of tumour, stroma, adipose, normal duct and immune tissue, with background
   patches on the rim. Features are tissue prototype + spatially smooth within-type structure + isotropic
   noise + a slide-level stain offset; only tumour and tumour–stroma interface patches (capped at
   ``max_informative_fraction`` of the bag) add ``signal_strength · relevance · U (v ⊙ z)``, a weak image of
   the programs. The ``.h5`` files store that ``relevance`` and the ``tissue`` type of each patch.
4. External cohorts pass every feature through a scanner-like affine map (channel scale, offset, mixing),
   have their own slide-level stain directions, and their own bag sizes.
5. Optionally (``n_sites`` > 0) internal patients belong to tissue source sites: each site shifts the latent
   program means of its patients (its case mix, so its prevalences) and adds a constant offset to every
   patch feature of its slides (its stain and scanner signature); drawn from a stream of their own, so the
   rest of the cohort is drawn as without sites.
6. Optionally (``heldout`` > 0) a held-out cohort of more patients from the internal distribution (its
   latent programs, scanner, bags, sites and omics), from seed streams of its own: inference only.

Everything is drawn from ``numpy`` generators seeded by ``(seed, cohort, patient, slide)``, so a cohort is
identical whatever order it is generated in. Nothing here is tuned for any method: it is a known truth.

Length (~420 lines): the whole generative model in one module, so its constants and draws read together;
the per-slide layout and features (``_layout``, ``_features``) are the seam to split at next.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import binary_dilation, gaussian_filter
from scipy.special import ndtr, ndtri

from ..formats import write_trident_h5
from .spec import GENERATOR_VERSION, HELDOUT, PROGRAMS, ExternalSpec, SyntheticSpec

__all__ = ["LABELS_FILE", "LABEL_VALUES", "TISSUES", "generate", "label_posterior"]

#: tissue codes stored in each slide's ``tissue`` dataset (index = code).
TISSUES = ("background", "tumour", "stroma", "adipose", "normal_duct", "immune")
#: each cohort's labels table, ``<cohort>/labels.csv``.
LABELS_FILE = "labels.csv"
#: label column -> (positive value, negative value).
LABEL_VALUES = {"her2": ("positive", "negative"), "pr": ("positive", "negative"), "odx_risk": ("high", "low")}

# Program correlations (symmetric, positive definite): luminal tumours proliferate less and are rarely basal,
# basal tumours proliferate more, proliferation draws some immune infiltrate.
_PROGRAM_CORR = np.array(
    [
        [1.0, -0.1, 0.1, 0.0, 0.0, -0.1],
        [-0.1, 1.0, -0.3, 0.0, 0.0, -0.5],
        [0.1, -0.3, 1.0, 0.2, 0.0, 0.3],
        [0.0, 0.0, 0.2, 1.0, 0.1, 0.1],
        [0.0, 0.0, 0.0, 0.1, 1.0, 0.0],
        [-0.1, -0.5, 0.3, 0.1, 0.0, 1.0],
    ]
)
# Label scores as weights on the programs: HER2 follows the ERBB2 amplicon, PR the luminal (hormone) program,
# ODX high risk a high proliferation and a low luminal program (as the Oncotype DX recurrence score does).
_TASK_WEIGHTS = {
    "her2": np.array([1.0, 0.0, 0.25, 0.0, 0.0, 0.0]),
    "pr": np.array([0.0, 1.0, 0.0, 0.0, 0.0, -0.25]),
    "odx_risk": np.array([0.0, -0.6, 0.8, 0.0, 0.0, 0.0]),
}
# Tissue composition of a slide: Dirichlet around these proportions of the region types
# (tumour, stroma, adipose, normal duct, immune); the immune share rises with the immune program.
_REGION_TYPES = np.array([1, 2, 3, 4, 5])
_REGION_BASE = np.array([0.15, 0.38, 0.22, 0.10, 0.15])
_REGION_CONCENTRATION = 10.0
_IMMUNE_PROGRAM_EFFECT = 0.6
_PATCHES_PER_REGION = 40  # mean Voronoi region size, in patches
_TISSUE_FILL = 0.45  # share of the grid's bounding box covered by tissue
_STRUCTURE_RANK = 8  # rank of the within-type structured noise
_STAIN_RANK = 4  # rank of the slide-level stain offset
_INTERFACE_RELEVANCE = 0.5  # relevance of stroma patches touching tumour (tumour patches: 1.0)
_NOISE_GENE_FRACTION = 0.15  # genes with no primary program
_PATCH_SIZE, _PATCH_SIZE_LEVEL0 = 256, 512
_HELDOUT_INDEX = 1000  # the held-out cohort's seed index (internal 0, external cohorts 1, 2, ...)  # 20x patches of a 40x slide, as TRIDENT names them


# ---------------------------------------------------------------------------------------------- the world


@dataclass
class _World:
    """Parameters shared by every cohort of one seed: the biology and the feature extractor."""

    corr_chol: np.ndarray  # (K, K) Cholesky factor of the program correlation
    thresholds: dict[str, float]  # label column -> score threshold
    score_noise: dict[str, float]  # label column -> sd of the score noise
    gene_base: np.ndarray  # (G,) log-mean baselines
    gene_loadings: np.ndarray  # (G, K)
    gene_dispersion: np.ndarray  # (G,)
    basis: np.ndarray  # (T + T·R, D) float32: tissue prototypes, then each tissue's R structure directions
    stain: np.ndarray  # (S, D) internal stain-offset directions, unit per-dimension variance
    signal: np.ndarray  # (K, D) orthonormal program directions U^T


def _draw_world(spec: SyntheticSpec) -> _World:
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 0]))
    k, g = len(PROGRAMS), spec.n_genes
    chol = np.linalg.cholesky(_PROGRAM_CORR)
    thresholds, score_noise = {}, {}
    for col, w in _TASK_WEIGHTS.items():
        latent_sd = math.sqrt(w @ _PROGRAM_CORR @ w)
        score_noise[col] = spec.label_noise * latent_sd
        total_sd = latent_sd * math.sqrt(1.0 + spec.label_noise**2)
        thresholds[col] = total_sd * float(ndtri(1.0 - spec.prevalences[col]))

    gene_base = rng.uniform(math.log(0.5), math.log(5000.0), size=g)
    primary = rng.integers(0, k, size=g)
    has_primary = rng.random(g) >= _NOISE_GENE_FRACTION
    loadings = rng.normal(0.0, 0.15 * spec.gene_loading, size=(g, k))
    strength = spec.gene_loading * rng.uniform(0.5, 1.5, size=g) * rng.choice([-1.0, 1.0], size=g)
    loadings[np.arange(g), primary] += np.where(has_primary, strength, 0.0)
    dispersion = spec.gene_dispersion * np.exp(rng.normal(0.0, 0.5, size=g))
    return _World(chol, thresholds, score_noise, gene_base, loadings, dispersion, *_draw_extractor(spec, rng))


def _draw_extractor(
    spec: SyntheticSpec, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A feature extractor's part of the world, in ``spec.feature_dim`` dimensions: the basis (tissue
    prototypes and structure directions), the stain directions and the program directions."""
    k, d, t = len(PROGRAMS), spec.feature_dim, len(TISSUES)
    prototypes = rng.standard_normal((t, d))
    structure = np.stack([_orthonormal_rows(rng, _STRUCTURE_RANK, d) for _ in range(t)])
    structure *= spec.structure_scale * math.sqrt(d / _STRUCTURE_RANK)
    stain = _orthonormal_rows(rng, _STAIN_RANK, d) * math.sqrt(d / _STAIN_RANK)
    signal = _orthonormal_rows(rng, k, d)
    basis = np.concatenate([prototypes, structure.reshape(t * _STRUCTURE_RANK, d)]).astype(np.float32)
    return basis, stain, signal


@dataclass
class _Backbone:
    """One feature set of every cohort: the spec its features are drawn with (its width, noise, signal and
    visibility), its part of the world, its folder, and its index (0: the main one; part of its seeds)."""

    spec: SyntheticSpec
    world: _World
    folder: str
    index: int

    def seed(self, *key: int) -> np.random.SeedSequence:
        """The seed of a draw ``key`` of this backbone (the main backbone's seeds are the key alone, as they
        were before there were several)."""
        return np.random.SeedSequence([*key] if self.index == 0 else [*key, 100 + self.index])


def _backbones(spec: SyntheticSpec, world: _World) -> list[_Backbone]:
    """The main feature set, then each of ``spec.backbones`` with its own extractor (its own stream)."""
    out = [_Backbone(spec, world, "features", 0)]
    for i, b in enumerate(spec.backbones, start=1):
        view = spec.for_backbone(b)
        extractor = _draw_extractor(view, np.random.default_rng(np.random.SeedSequence([spec.seed, 4, i])))
        out.append(
            _Backbone(
                view,
                dataclasses.replace(world, **dict(zip(("basis", "stain", "signal"), extractor, strict=True))),
                f"features_{b.name}",
                i,
            )
        )
    return out


def label_posterior(spec: SyntheticSpec, label_col: str, z: np.ndarray) -> np.ndarray:
    """P(``label_col`` = its first value of :data:`LABEL_VALUES` | programs ``z``) under the generator's rule
    (``s = w·z + e > t``): ``Φ((w·z − t) / sd(e))``, the Bayes-optimal prediction from the true programs.

    ``z`` is ``(n, K)`` in :data:`PROGRAMS` order (``latent.csv``'s program columns). Monotone in ``w·z``, so
    its AUC is that of the noise-free latent score: the ceiling of any predictor (docs/synthetic.md).
    """
    world = _draw_world(spec)
    score = np.asarray(z, dtype=np.float64) @ _TASK_WEIGHTS[label_col]
    return ndtr((score - world.thresholds[label_col]) / world.score_noise[label_col])


def _orthonormal_rows(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    """``rows`` random orthonormal vectors of length ``dim`` (shape ``(rows, dim)``; rows <= dim)."""
    q, _ = np.linalg.qr(rng.standard_normal((dim, min(rows, dim))))
    out = np.zeros((rows, dim))
    out[: q.shape[1]] = q.T
    return out


@dataclass
class _Scanner:
    """How a cohort's slides were scanned: per-slide stain offsets and, for external sites, an affine map."""

    stain: np.ndarray  # (S, D) stain-offset directions, scaled: a slide adds N(0, I_S) coefficients @ stain
    mixing_t: np.ndarray | None = None  # (D, D) transposed mixing M^T
    scale: np.ndarray | None = None  # (D,) channel scales
    offset: np.ndarray | None = None  # (D,) channel offsets

    def apply(self, feats: np.ndarray) -> np.ndarray:
        """``s ⊙ (M x) + o`` on ``(N, D)`` features (identity for the internal scanner)."""
        if self.mixing_t is None:
            return feats
        return (feats @ self.mixing_t) * self.scale + self.offset


def _scanner(backbone: _Backbone, ext: ExternalSpec | None, index: int) -> _Scanner:
    """How cohort ``index`` was scanned, as ``backbone`` sees it: the internal stain (``ext`` None), or an
    external cohort's own stain directions and affine feature map."""
    spec = backbone.spec
    if ext is None:
        return _Scanner(backbone.world.stain * spec.stain_scale)
    rng = np.random.default_rng(backbone.seed(spec.seed, 0, index))
    d, f = spec.feature_dim, ext.feature_shift
    stain = _orthonormal_rows(rng, _STAIN_RANK, d) * ext.stain_scale * math.sqrt(d / _STAIN_RANK)
    mixing = np.eye(d) + 0.2 * f * rng.standard_normal((d, d)) / math.sqrt(d)
    scale = np.exp(rng.normal(0.0, 0.2 * f, size=d))
    offset = rng.normal(0.0, 0.5 * f, size=d)
    return _Scanner(stain, *(a.astype(np.float32) for a in (mixing.T, scale, offset)))


# ------------------------------------------------------------------------------------------------ cohorts


@dataclass
class _Cohort:
    folder: str
    prefix: str  # case ids are <prefix>-0001
    n_patients: int
    bag_min: int
    bag_max: int
    latent_shift: np.ndarray  # (K,)
    internal: bool  # drawn from the internal distribution (omics, sites, scanner), not at an external site
    ext: ExternalSpec | None  # None: the internal distribution
    index: int  # 0 internal, _HELDOUT_INDEX held-out, i for the i-th external cohort (part of every seed)


def generate(spec: SyntheticSpec, out: Path) -> None:
    """Write every cohort of ``spec`` (the internal one, the held-out one if any, then each external one) into
    ``out/<cohort name>/``."""
    world = _draw_world(spec)
    backbones = _backbones(spec, world)
    no_shift = np.zeros(len(PROGRAMS))
    cohorts = [
        _Cohort("internal", "SYN", spec.n_patients, spec.bag_min, spec.bag_max, no_shift, True, None, 0)
    ]
    if spec.heldout:  # the internal distribution, from seed streams of its own
        cohorts.append(
            _Cohort(
                HELDOUT,
                HELDOUT.upper(),
                spec.heldout,
                spec.bag_min,
                spec.bag_max,
                no_shift,
                True,
                None,
                _HELDOUT_INDEX,
            )
        )
    for i, ext in enumerate(spec.external, start=1):
        cohorts.append(
            _Cohort(
                ext.name,
                ext.name.upper(),
                ext.n_patients,
                ext.bag_min,
                ext.bag_max,
                np.asarray(ext.latent_shift),
                False,
                ext,
                i,
            )
        )
    sites = _sites(spec, backbones)
    for cohort in cohorts:
        _write_cohort(spec, world, backbones, cohort, out / cohort.folder, sites if cohort.internal else None)


def _write_cohort(
    spec: SyntheticSpec,
    world: _World,
    backbones: list[_Backbone],
    cohort: _Cohort,
    out: Path,
    sites: _Sites | None,
) -> None:
    """Patients (latent programs, labels, omics) and their slides of one cohort, in every feature set;
    ``sites``: the sites its patients belong to (the internal distribution's, when there are sites)."""
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 1, cohort.index]))
    n, k = cohort.n_patients, len(PROGRAMS)
    z = rng.standard_normal((n, k)) @ world.corr_chol.T + cohort.latent_shift  # (n, K)
    of = None if sites is None else sites.members(spec, cohort.index, n)
    if of is not None:
        z += sites.latent_shift[of]
    scores = {c: z @ w + world.score_noise[c] * rng.standard_normal(n) for c, w in _TASK_WEIGHTS.items()}
    n_slides = 1 + (rng.random(n) < spec.second_slide_fraction)
    case_ids = [f"{cohort.prefix}-{i + 1:04d}" for i in range(n)]

    views = [
        _View(b, _scanner(b, cohort.ext, cohort.index), None if sites is None else sites.offset[b.index])
        for b in backbones
    ]
    for b in backbones:
        (out / b.folder).mkdir(parents=True)
    rows = []
    for i, case_id in enumerate(case_ids):
        labels = [LABEL_VALUES[c][0 if scores[c][i] > world.thresholds[c] else 1] for c in _TASK_WEIGHTS]
        for j in range(n_slides[i]):
            slide_id = f"{case_id}-{j + 1:02d}"
            key = (spec.seed, 2, cohort.index, i, j)
            site = None if of is None else of[i]
            _write_slide(spec, views, cohort, z[i], key, site, out, f"{slide_id}.h5")
            rows.append([case_id, slide_id, *labels, *([] if of is None else [f"site_{of[i] + 1:02d}"])])
    header = ["case_id", "slide_id", *_TASK_WEIGHTS, *([] if sites is None else ["site"])]
    _write_csv(out / LABELS_FILE, header, rows)
    _write_csv(
        out / "latent.csv",
        ["case_id", *PROGRAMS, *(f"score_{c}" for c in _TASK_WEIGHTS)],
        [
            [cid, *(f"{v:.6f}" for v in z[i]), *(f"{scores[c][i]:.6f}" for c in _TASK_WEIGHTS)]
            for i, cid in enumerate(case_ids)
        ],
    )
    if cohort.internal:
        counts = _omics(spec, world, z, rng)
        keep = np.flatnonzero(rng.random(n) < spec.omics_fraction)
        genes = [f"gene_{g + 1:04d}" for g in range(spec.n_genes)]
        _write_csv(out / "omics.csv", ["case_id", *genes], [[case_ids[i], *counts[i].tolist()] for i in keep])


@dataclass
class _Sites:
    """The tissue source sites of the internal distribution (``n_sites`` > 0)."""

    share: np.ndarray  # (S,) Dirichlet(2) share of the patients at each site
    latent_shift: np.ndarray  # (S, K) shift of the program means of each site's patients
    offset: list[np.ndarray]  # per backbone, (S, D_b) float32 constant feature offset of each site's slides

    def members(self, spec: SyntheticSpec, index: int, n: int) -> np.ndarray:
        """``(n,)`` site of each patient of cohort ``index`` (internal or held-out), from a stream of its own."""
        rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 3, index]))
        return rng.choice(len(self.share), size=n, p=self.share)


def _sites(spec: SyntheticSpec, backbones: list[_Backbone]) -> _Sites | None:
    """The sites (sizes, latent shifts, feature offsets per backbone), from a stream of their own; None
    without."""
    if not spec.n_sites:
        return None
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 3]))
    s = spec.n_sites
    share = rng.dirichlet(np.full(s, 2.0))
    shift = rng.normal(0.0, spec.site_latent_shift, size=(s, len(PROGRAMS)))
    offsets = [rng.normal(0.0, spec.site_stain_scale, size=(s, spec.feature_dim)).astype(np.float32)]
    for b in backbones[1:]:
        brng = np.random.default_rng(b.seed(spec.seed, 3))
        offsets.append(
            brng.normal(0.0, spec.site_stain_scale, size=(s, b.spec.feature_dim)).astype(np.float32)
        )
    return _Sites(share, shift, offsets)


def _omics(spec: SyntheticSpec, world: _World, z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Negative-binomial (gamma-Poisson) counts ``(n, G)`` with log-mean = baseline + loadings·z + library."""
    library = rng.normal(0.0, 0.25, size=(len(z), 1))
    mean = np.exp(world.gene_base + z @ world.gene_loadings.T + library)
    shape = 1.0 / world.gene_dispersion
    return rng.poisson(rng.gamma(shape, mean / shape)).astype(np.int64)


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------- slides


@dataclass
class _View:
    """One cohort as one backbone sees it: the backbone, the cohort's scanner, its sites' offsets (or None)."""

    backbone: _Backbone
    scanner: _Scanner
    site_offsets: np.ndarray | None  # (S, D_b)


def _write_slide(
    spec: SyntheticSpec,
    views: list[_View],
    cohort: _Cohort,
    z: np.ndarray,
    key: tuple[int, ...],
    site: int | None,
    out: Path,
    name: str,
) -> None:
    """One slide's TRIDENT file in each feature set: one layout (drawn from the slide's seed ``key``), each
    backbone's features of it (the main one's from the same stream, as before there were several)."""
    rng = np.random.default_rng(np.random.SeedSequence(key))
    n = round(math.exp(rng.uniform(math.log(cohort.bag_min), math.log(cohort.bag_max))))
    composition = _composition(z, rng)
    layout = _layout(n, composition, spec.max_informative_fraction, rng)
    for view in views:
        b = view.backbone
        brng = rng if b.index == 0 else np.random.default_rng(b.seed(*key))
        feats = view.scanner.apply(_features(b.spec, b.world, view.scanner, layout, z, brng))
        if view.site_offsets is not None and site is not None:
            feats += view.site_offsets[site]
        write_trident_h5(
            out / b.folder / name,
            feats.astype(spec.feature_dtype),
            layout.coords * _PATCH_SIZE_LEVEL0,
            patch_size=_PATCH_SIZE,
            patch_size_level0=_PATCH_SIZE_LEVEL0,
            encoder=f"synthetic-v{GENERATOR_VERSION}" + (f"-{b.folder}" if b.index else ""),
            extras={"relevance": layout.relevance, "tissue": layout.tissue},
        )


def _composition(z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Region-type proportions of one slide ``(5,)``; the immune share rises with the immune program."""
    logits = np.log(_REGION_BASE)
    logits[-1] += _IMMUNE_PROGRAM_EFFECT * z[PROGRAMS.index("immune")]
    mean = np.exp(logits) / np.exp(logits).sum()
    return rng.dirichlet(_REGION_CONCENTRATION * mean)


@dataclass
class _Layout:
    coords: np.ndarray  # (N, 2) int64 grid (x, y)
    tissue: np.ndarray  # (N,) int8 codes into TISSUES
    relevance: np.ndarray  # (N,) float32 in {0, 0.5, 1}
    coef: np.ndarray  # (N, R) spatially smooth structured-noise coefficients


def _smooth_fields(
    rng: np.random.Generator, shape: tuple[int, int], channels: int, sigma: float
) -> np.ndarray:
    """``channels`` Gaussian random fields of unit sd, smoothed over ``sigma`` cells, shape ``(H, W, C)``."""
    f = gaussian_filter(rng.standard_normal((*shape, channels)), sigma=(sigma, sigma, 0), mode="wrap")
    return f / np.maximum(f.std(axis=(0, 1), keepdims=True), 1e-8)


def _layout(n: int, composition: np.ndarray, max_informative: float, rng: np.random.Generator) -> _Layout:
    """Irregular tissue of ``n`` patches on a grid: background rim, Voronoi regions, informative tumour."""
    aspect = math.exp(rng.uniform(-0.4, 0.4))
    area = n / _TISSUE_FILL
    h = max(math.ceil(math.sqrt(area / aspect)), 3)
    w = max(math.ceil(area / h), 3)
    while h * w < n:
        w += 1
    # Tissue: the n highest cells of a smooth random field plus a central envelope (fragments, ragged edges).
    fields = _smooth_fields(rng, (h, w), 3 + _STRUCTURE_RANK, sigma=max(h, w) / 10)
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    height = fields[..., 0] - 1.5 * (yy**2 + xx**2)
    order = np.argsort(-height.ravel(), kind="stable")[:n]
    ys, xs = np.unravel_index(order, (h, w))
    tissue = np.zeros(n, dtype=np.int8)

    # Background: the lowest cells of the tissue (its rim), 2-8 % of the bag.
    n_bg = round(rng.uniform(0.02, 0.08) * n)
    fg = np.arange(n - n_bg)  # ``order`` is sorted by height, so the rim is the tail

    # Regions: Voronoi cells around seeds on warped coordinates, each seed's type from the composition.
    n_seeds = int(np.clip(len(fg) // _PATCHES_PER_REGION, 1, 48)) if len(fg) else 0
    if n_seeds:
        seeds = rng.choice(fg, size=n_seeds, replace=False)
        seed_types = _REGION_TYPES[rng.choice(len(_REGION_TYPES), size=n_seeds, p=composition)]
        if not (seed_types == TISSUES.index("tumour")).any():
            seed_types[rng.integers(n_seeds)] = TISSUES.index("tumour")
        warp = 0.3 * math.sqrt(_PATCHES_PER_REGION) * fields[ys, xs, 1:3]  # (n, 2)
        pos = np.stack([ys, xs], axis=1) + warp
        dist = ((pos[fg, None, :] - pos[None, seeds, :]) ** 2).sum(-1)  # (n_fg, n_seeds)
        tissue[fg] = seed_types[dist.argmin(axis=1)]
        tissue[seeds] = seed_types

    # Informative patches: tumour (1.0) and stroma touching tumour (0.5), at most max_informative of the bag,
    # kept as the ones nearest a hotspot when there are more.
    grid = np.full((h, w), -1, dtype=np.int8)
    grid[ys, xs] = tissue
    tumour_grid = grid == TISSUES.index("tumour")
    near_tumour = binary_dilation(tumour_grid, structure=np.ones((3, 3), dtype=bool))[ys, xs]
    relevance = np.zeros(n, dtype=np.float32)
    relevance[tissue == TISSUES.index("tumour")] = 1.0
    relevance[(tissue == TISSUES.index("stroma")) & near_tumour] = _INTERFACE_RELEVANCE
    informative = np.flatnonzero(relevance > 0)
    cap = max(1, math.floor(max_informative * n))
    if len(informative) > cap:
        hot = informative[rng.integers(len(informative))]
        d2 = (ys[informative] - ys[hot]) ** 2 + (xs[informative] - xs[hot]) ** 2
        drop = informative[np.argsort(d2, kind="stable")[cap:]]
        relevance[drop] = 0.0

    coords = np.stack([xs, ys], axis=1).astype(np.int64)
    return _Layout(coords, tissue, relevance, fields[ys, xs, 3:])


def _features(
    spec: SyntheticSpec,
    world: _World,
    scanner: _Scanner,
    layout: _Layout,
    z: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Patch features ``(N, D)`` float32: prototype + structure + noise + stain + relevance · signal."""
    n, t, r = len(layout.tissue), len(TISSUES), _STRUCTURE_RANK
    rows = np.arange(n)[:, None]
    design = np.zeros((n, t + t * r), dtype=np.float32)  # one-hot tissue | its structure coefficients
    design[rows[:, 0], layout.tissue] = 1.0
    design[rows, t + layout.tissue[:, None] * r + np.arange(r)] = layout.coef
    feats = rng.standard_normal((n, spec.feature_dim), dtype=np.float32)
    feats *= spec.noise_scale
    feats += design @ world.basis
    stain = rng.standard_normal(_STAIN_RANK) @ scanner.stain  # (D,)
    program = spec.signal_strength * ((np.asarray(spec.program_visibility) * z) @ world.signal)  # (D,)
    feats += stain.astype(np.float32)
    feats += layout.relevance[:, None] * program.astype(np.float32)
    return feats
