"""The one interface every MIL method implements.

A method is an :class:`MILMethod` (an ``nn.Module``) built from a typed :class:`MethodCfg` whose defaults
are the authors' own. The trainer, evaluator and runner only ever call the methods defined here:

- ``forward(bag) -> MILOutput``: the H&E-only path (logits, patch attention, slide embedding);
- ``loss(bag, out) -> dict[str, Tensor]``: every named term, already weighted; the trainer sums them;
- ``batches_windows`` and ``window_loss(bags)``: opt-in, a method that steps once per window of bags
  takes the whole window in one forward (the trainer then calls it instead of ``forward`` + ``loss``);
- ``prepare(train_bags)``: optional one-off fitting on the training split (k-means memory init, gene masks, ...);
- ``after_step()``: optional hook after each optimiser step (EMA memory updates, ...);
- ``on_epoch_start(epoch)``, ``on_epoch_end(epoch)``, ``training_report()``: optional hooks (window
  buffers; per-epoch facts for the history and final facts for metrics.json; e.g. memory pruning);
- ``predict_logits(bags)``, ``validation_logits_batch(bags)``: several bags per forward for inference and
  validation, each bag's values as alone (default: one by one; methods pack them, ``packing.py``);
- ``configure_optimizer()``: the optimiser and scheduler of the authors' code, read from the config;
- ``search_space(trial)``: Optuna search space as config overrides;
- ``explain_maps(bag, out)``: named per-patch maps beyond the attention, for ``bench explain``;
- ``cfg.needs()``: what the harness must attach to each bag (graph, omics, gene groups), as :class:`DataNeeds`.

Each method's class also says where it comes from (``paper``, ``paper_url``, ``code_url``, ``code_commit``).

Nothing in ``methods/`` knows about files, folds or the command line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "HEADS",
    "Bag",
    "DataNeeds",
    "MILMethod",
    "MILOutput",
    "MethodCfg",
    "PatchMap",
    "discrete_time_nll",
    "survival_curves",
]

#: what a method's ``num_classes`` outputs mean (``MethodCfg.head``)
HEADS = ("classification", "survival")


def discrete_time_nll(
    logits: Tensor,
    bin_index: Tensor,
    event: Tensor,
    alpha: float = 0.0,
    eps: float = 1e-7,
    reduction: str = "mean",
) -> Tensor:
    r"""Negative log-likelihood of the discrete-time survival model (Zadeh & Schmid 2020) in the form of
    ``nll_loss`` of Patch-GCN / MCAT / G-HANet (``utils/utils.py``): hazards :math:`h = \sigma(z)` over the
    K time bins, survival :math:`S_k = \prod_{j \le k} (1 - h_j)`, :math:`S_{-1} = 1`; with y the patient's bin
    and c = 1 − event (censored),

    .. math::
        L_{unc} = -(1 - c)\,[\log S_{y-1} + \log h_y],\quad L_{cens} = -c \log S_y,\quad
        L = (1 - lpha)(L_{unc} + L_{cens}) + lpha L_{unc}

    every log clamped at ``eps``; α = ``alpha`` (G-HANet's ``--alpha_surv`` default 0). Shapes: logits
    ``(K,)`` or ``(B, K)``, bin index and event ``()`` or ``(B,)`` -> the mean over rows (``reduction="sum"``:
    their sum).
    """
    z = logits.reshape(-1, logits.shape[-1])
    y = bin_index.reshape(-1, 1).long()
    c = 1.0 - event.reshape(-1, 1).to(z.dtype)
    hazards = torch.sigmoid(z)
    padded = torch.cat([torch.ones_like(c), torch.cumprod(1 - hazards, dim=1)], dim=1)  # S_{-1} = 1
    uncensored = -(1 - c) * (
        padded.gather(1, y).clamp(min=eps).log() + hazards.gather(1, y).clamp(min=eps).log()
    )
    censored = -c * padded.gather(1, y + 1).clamp(min=eps).log()
    rows = (1 - alpha) * (uncensored + censored) + alpha * uncensored
    return rows.sum() if reduction == "sum" else rows.mean()


def survival_curves(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Risk and survival function of discrete-time hazard logits ``(..., K)``: ``S_k = Π_{j<=k}(1 - σ(z_j))``
    at the end of each bin ``(..., K)``, and the risk ``−Σ_k S_k`` (``(...)``, higher = earlier event), as
    Patch-GCN / MCAT / G-HANet score their c-index."""
    s = torch.cumprod(1 - torch.sigmoid(logits), dim=-1)
    return -s.sum(-1), s


@dataclass
class Bag:
    """One slide: its patch features and everything a method may read.

    Attributes:
        features: patch features of shape ``(N, D)``.
        label: class index, a long tensor of shape ``()``.
        coords: patch coordinates in grid units (one patch = 1), shape ``(N, 2)``, or None (CLAM ``.pt``).
        edge_index: spatial kNN graph, shape ``(2, E)``, row 0 source, row 1 target (PyG), or None.
        omics: the patient's gene vector of shape ``(G,)``, already transformed and scaled, or None.
            Training-time only: the runner never passes it when predicting.
        slide_id, case_id: identifiers, kept as strings.
        event: survival tasks: 1 event, 0 censored (long, shape ``()``); ``label`` is then the discrete time
            bin of the follow-up time. None for classification.
        time: survival tasks: the follow-up time (float, shape ``()``), or None.
    """

    features: Tensor
    label: Tensor
    coords: Tensor | None = None
    edge_index: Tensor | None = None
    omics: Tensor | None = None
    slide_id: str = ""
    case_id: str = ""
    event: Tensor | None = None
    time: Tensor | None = None

    @property
    def num_patches(self) -> int:
        return self.features.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Bag:
        """Copy of the bag with every tensor on ``device``."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return dataclasses.replace(
            self,
            features=move(self.features),
            label=move(self.label),
            coords=move(self.coords),
            edge_index=move(self.edge_index),
            omics=move(self.omics),
            event=move(self.event),
            time=move(self.time),
        )

    def without_omics(self) -> Bag:
        return dataclasses.replace(self, omics=None)


@dataclass
class MILOutput:
    """What ``forward`` returns.

    Attributes:
        logits: class logits of shape ``(C,)``.
        attention: patch weights of shape ``(N,)`` (sum to one where the method pools by attention), or None.
        embedding: slide embedding of shape ``(E,)``.
        extras: method-specific tensors the method's own ``loss`` needs (never read by the harness).
    """

    logits: Tensor
    embedding: Tensor
    attention: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PatchMap:
    """One named per-patch map a method offers ``bench explain`` beside its attention.

    Attributes:
        values: one value per patch, shape ``(N,)``, float; for a categorical map, each patch's category index.
        categories: names of the categories, indexed by ``values``; None for a continuous map.
        classes: for a categorical map, the class index each category belongs to (the harness draws each
            class's categories in one colour family); None: no grouping.
    """

    values: Tensor
    categories: tuple[str, ...] | None = None
    classes: tuple[int, ...] | None = None


@dataclass(frozen=True)
class DataNeeds:
    """What the harness must provide a method with, declared by its config (:meth:`MethodCfg.needs`).

    Attributes:
        graph: each bag carries the spatial kNN graph (``bag.edge_index``, built with ``graph_k`` and
            ``graph_symmetric``).
        omics: the method reads ``bag.omics`` in ``loss``/``prepare`` (training only).
        gene_groups: the config has a ``gene_groups`` field (group index per gene) that the harness fills,
            via ``cfg.replace(gene_groups=...)``, from the task's ``omics_groups`` file.
        privileged: ``bag.omics`` carries, instead of the omics, the patient's true latent programs (training
            only), which only a synthetic task has: the privileged-information student of the report's
            ceilings, not a method a real cohort can run.
    """

    graph: bool
    omics: bool
    gene_groups: bool
    privileged: bool = False


@dataclass
class MethodCfg:
    """Training settings shared by every method; subclasses add the architecture and set the authors' defaults.

    Each field's default here is a neutral one; a method's config subclass overrides it with its
    reference code's value and says where it comes from.
    """

    num_classes: int = 2  # outputs: class logits (classification) or one hazard logit per time bin (survival)
    #: classification: softmax cross-entropy over the num_classes logits; survival: discrete-time hazards and
    #: :func:`discrete_time_nll` (set by the harness from the task's type; ``task_loss`` applies it)
    head: str = "classification"
    surv_alpha: float = 0.0  # survival: weight of the uncensored term (G-HANet's --alpha_surv, default 0)
    dropout: float = 0.25
    optimizer: str = "adam"  # adam | adamw
    lr: float = 1e-4
    weight_decay: float = 1e-5
    scheduler: str = "none"  # none | plateau | cosine | linear (to zero over ``epochs``)
    plateau_factor: float = 0.2
    plateau_patience: int = 5
    cosine_t_max: int = 50
    #: cap on training epochs; None: none, ``max_updates`` alone ends training (then the trainer sets it to
    #: the epochs that budget takes on the fold's training bags)
    epochs: int | None = 100
    patience: int = 20  # early stopping, epochs without a better validation score
    #: a later epoch whose validation score ties the best one replaces it (checkpoint and patience counter),
    #: as ``EarlyStopping`` in CLAM and MoMKD (``score < best`` is the only "worse") and WiKG's ``train.py``
    #: (``max_val_auc == val_auc`` saves); False: only a strictly better score counts (MKD, G-HANet, TDC)
    keep_tied_best: bool = False
    min_epochs: int = 0  # no early stop before this many epochs
    #: The convergence rule in optimiser updates (the built-in tasks' ``train:`` block, docs/protocol.md
    #: "Convergence"); None keeps the epoch rule above. Set, it ends training after ``max_updates`` updates,
    #: validates every ``val_every`` updates (mid-epoch too) and stops early once ``min_updates`` are done
    #: and ``patience_updates`` updates have passed without a better selection score; ``patience`` and
    #: ``min_epochs`` are then not read.
    max_updates: int | None = None
    val_every: int = 0
    patience_updates: int = 0
    min_updates: int = 0
    #: the selection score of a validation check (checkpoint, early stopping, plateau scheduler): the mean
    #: of the monitor over the last this many checks (1: the check's own value, the published rule)
    val_smoothing: int = 1
    #: validation score for early stopping and checkpoint selection: auc | loss | mean-auc (the mean of the
    #: AUCs of the models ``validation_logits`` returns, e.g. MKD's student and teachers)
    monitor: str = "auc"
    grad_clip: float | None = None  # max gradient norm
    balanced_sampling: bool = False  # class-balanced sampling with replacement
    accumulation_steps: int = 1  # optimiser step every this many bags
    accumulation_mean: bool = False  # each bag's loss / accumulation_steps before backward (G-HANet's gc)
    #: a partial last window's gradients carry into the next epoch (no step, no zeroing at the epoch's end)
    carry_partial_window: bool = False
    needs_graph: bool = False  # the spatial kNN graph must be attached to each bag
    graph_k: int = 8
    graph_symmetric: bool = False
    uses_omics: bool = False  # the method reads bag.omics in loss/prepare

    def replace(self, **overrides: Any) -> MethodCfg:
        """A copy with ``overrides`` applied; unknown names are an error that names the valid ones."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(
                f"unknown setting(s) {unknown} for {type(self).__name__}; valid: {', '.join(sorted(names))}"
            )
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def needs(self) -> DataNeeds:
        """What the harness must attach to each bag; a config with a ``gene_groups`` field overrides it."""
        return DataNeeds(graph=self.needs_graph, omics=self.uses_omics, gene_groups=False)


def linear_decay(optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate ``lr * (1 - (e + 1) / (epochs + 1))`` after epoch ``e`` (stepped once per epoch): linear
    decay towards zero, as pix2pix-style ``lr_policy='linear'`` with ``niter=0`` (Xing et al.'s TDC code)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1 - (e + 1) / (epochs + 1))


class MILMethod(nn.Module):
    """Base class of every registered method.

    Args:
        cfg: the method's config (its own ``MethodCfg`` subclass).
        in_dim: patch feature width D, read from the data.
        omics_dim: gene vector width G, or None when the task has no omics.
    """

    name: ClassVar[str] = ""  # set by ``register_method``
    cfg_class: ClassVar[type[MethodCfg]] = MethodCfg
    #: named variants: small overrides of the default config (ablations, memory modes, paper-vs-code).
    variants: ClassVar[dict[str, dict[str, Any]]] = {}
    #: what ``bench ablate`` runs: table name -> rows of (display label, variant name; "" = the default).
    #: e.g. ``{"ablation": [("WSI baseline", "wsi-baseline"), ("Full", "")]}``; each table lands in
    #: ``<out>/<task>/report/<table name>.{md,tex}``.
    ablations: ClassVar[dict[str, list[tuple[str, str]]]] = {}
    #: table name -> a sentence or two added to that ablation table's caption (e.g. what each row changes).
    ablation_notes: ClassVar[dict[str, str]] = {}
    #: one line for ``bench methods``.
    summary: ClassVar[str] = ""
    #: provenance (``register_method`` refuses an empty ``paper`` or ``code_url``): a short citation with
    #: venue and year, the paper's address, the authors' repository, and the commit its defaults were read from.
    paper: ClassVar[str] = ""
    paper_url: ClassVar[str] = ""
    code_url: ClassVar[str] = ""
    code_commit: ClassVar[str] = ""

    def __init__(self, cfg: MethodCfg, in_dim: int, omics_dim: int | None = None) -> None:
        super().__init__()
        if cfg.head not in HEADS:
            raise ValueError(f"unknown head {cfg.head!r}; use one of {', '.join(HEADS)}")
        self.cfg = cfg
        self.in_dim = in_dim
        self.omics_dim = omics_dim

    def forward(self, bag: Bag) -> MILOutput:
        raise NotImplementedError

    def loss(self, bag: Bag, out: MILOutput) -> dict[str, Tensor]:
        """Named, weighted loss terms; the default is the slide's task loss (:meth:`task_loss`: cross-entropy,
        ``ce``, or the survival likelihood, ``nll``).

        The trainer sums the terms and back-propagates once per bag; an empty dict means "nothing to
        back-propagate for this bag" (a method that works on windows of bags returns the whole window's
        terms on the window's last bag and sets ``accumulation_steps`` to the window length; it may also
        offer :meth:`window_loss`, the same terms from one batched forward of the window).
        """
        return {self.task_term: self.task_loss(out.logits, bag)}

    @property
    def batches_windows(self) -> bool:
        """Whether the trainer hands this method each window of ``accumulation_steps`` bags at once
        (:meth:`window_loss`) instead of one bag at a time (default: no)."""
        return False

    def window_loss(self, bags: Sequence[Bag]) -> dict[str, Tensor]:
        """The named loss terms of one window of bags (the trainer's chunk of ``accumulation_steps`` bags of
        the epoch order, or its shorter last one), in one batched forward: their sum is the sum over the
        window's bags of what :meth:`loss` returns bag by bag (so one backward of it gives the per-bag path's
        accumulated gradient; the trainer applies ``accumulation_mean`` to it as to each bag's), and ``{}``
        where that path back-propagates nothing (e.g. a partial window a method drops). Only called when
        :attr:`batches_windows` is True."""
        raise NotImplementedError(f"{type(self).__name__} does not batch its windows")

    @property
    def task_term(self) -> str:
        """The name of the task loss's term: ``ce`` (classification) or ``nll`` (survival)."""
        return "nll" if self.cfg.head == "survival" else "ce"

    def task_loss(self, logits: Tensor, bag: Bag) -> Tensor:
        """The loss of one slide's logits ``(C,)`` under the config's ``head``: cross-entropy against
        ``bag.label``, or the discrete-time survival NLL of ``bag.label`` (time bin) and ``bag.event``. Every
        method's slide-level supervision goes through here, so each one supports both heads."""
        if self.cfg.head == "survival":
            if bag.event is None:
                raise ValueError(f"survival head: slide {bag.slide_id!r} has no event indicator (bag.event)")
            return discrete_time_nll(logits, bag.label, bag.event, self.cfg.surv_alpha)
        return F.cross_entropy(logits.unsqueeze(0), bag.label.view(1))

    def task_loss_sum(self, logits: Tensor, bags: Sequence[Bag]) -> Tensor:
        """:meth:`task_loss` of each row of ``logits`` ``(B, C)`` against its bag, summed (one call)."""
        labels = torch.stack([b.label for b in bags]).view(-1)
        if self.cfg.head == "survival":
            missing = [b.slide_id for b in bags if b.event is None]
            if missing:
                raise ValueError(f"survival head: slide {missing[0]!r} has no event indicator (bag.event)")
            events = torch.stack([b.event for b in bags]).view(-1)
            return discrete_time_nll(logits, labels, events, self.cfg.surv_alpha, reduction="sum")
        return F.cross_entropy(logits, labels, reduction="sum")

    def prepare(self, train_bags: Sequence[Bag]) -> None:
        """Fit anything that needs the training split before the first step (default: nothing)."""

    def after_step(self) -> None:
        """Called after each optimiser step (default: nothing)."""

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each training epoch (default: nothing); e.g. to drop a partial window's buffer."""

    def on_epoch_end(self, epoch: int) -> dict[str, Any]:
        """Called after each training epoch, before validation (default: nothing); may change the model
        (e.g. prune memory components) and returns JSON-able facts the trainer adds to the epoch's history."""
        return {}

    def predict_logits(self, bags: Sequence[Bag]) -> Tensor:
        """Logits ``(B, C)`` of several bags (no omics read), for inference and validation.

        Each row equals ``self(bag).logits`` for that bag alone (``tests/methods/test_batched.py``); methods
        override this to run the bags in one packed forward (``methods/packing.py``). Default: one by one.
        """
        return torch.stack([self(bag).logits for bag in bags])

    def validation_logits(self, bag: Bag) -> dict[str, Tensor]:
        """Logits ``(C,)`` of every model whose validation AUC the ``mean-auc`` monitor averages; the bag
        carries omics when the method uses them. Default: the method's own prediction."""
        return {"model": self(bag.without_omics()).logits}

    def validation_logits_batch(self, bags: Sequence[Bag]) -> dict[str, tuple[list[int], Tensor]]:
        """:meth:`validation_logits` of several bags: per model, the positions of the bags it scores and
        their logits ``(B', C)``. Default: one bag at a time; a method may run them packed."""
        scored: dict[str, tuple[list[int], list[Tensor]]] = {}
        for i, bag in enumerate(bags):
            for name, z in self.validation_logits(bag).items():
                scored.setdefault(name, ([], []))[0].append(i)
                scored[name][1].append(z)
        return {name: (rows, torch.stack(z)) for name, (rows, z) in scored.items()}

    def last_epoch_modules(self) -> tuple[str, ...]:
        """Names of direct submodules that keep their last epoch's weights when the trainer restores the best
        validation epoch (default: none; MKD's teachers, as its reference saves them every epoch)."""
        return ()

    def training_report(self) -> dict[str, Any]:
        """JSON-able facts about the trained model for the fold's metrics (e.g. active memory components)."""
        return {}

    #: a privileged-information model (its config's ``needs().privileged``) names the label-only method it
    #: extends: the report measures how much of the gap between the two each distillation method closes
    label_only_twin: ClassVar[str] = ""

    #: what the cells of :meth:`summarise_reports` mean, for the caption of the report's table of them.
    reports_caption: ClassVar[str] = ""

    @classmethod
    def summarise_reports(cls, reports: Sequence[dict[str, Any]]) -> dict[str, str]:
        """The :meth:`training_report` of each fold of one task summarised as table cells (column -> text)
        for the report; default: none (the method is left out of that table)."""
        return {}

    def configure_optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        """Optimiser and (possibly None) scheduler as the config says."""
        cfg = self.cfg
        params = [p for p in self.parameters() if p.requires_grad]
        # fused kernels: same update rule, one kernel instead of a loop over tensors (~8x faster on CPU)
        fused = all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params)
        if cfg.optimizer == "adam":
            optimizer: torch.optim.Optimizer = torch.optim.Adam(
                params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused
            )
        elif cfg.optimizer == "adamw":
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
        else:
            raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use 'adam' or 'adamw'")
        if cfg.scheduler == "none":
            scheduler = None
        elif cfg.scheduler == "plateau":
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer,
                mode="min" if cfg.monitor == "loss" else "max",
                factor=cfg.plateau_factor,
                patience=cfg.plateau_patience,
            )
        elif cfg.scheduler == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.cosine_t_max)
        elif cfg.scheduler == "linear":
            scheduler = linear_decay(optimizer, cfg.epochs)
        else:
            raise ValueError(
                f"unknown scheduler {cfg.scheduler!r}; use 'none', 'plateau', 'cosine' or 'linear'"
            )
        return optimizer, scheduler

    def explain_maps(self, bag: Bag, out: MILOutput) -> dict[str, PatchMap]:
        """Named per-patch maps beyond the attention (which the harness takes from ``out.attention``), keyed
        by a panel title, from ``out = self(bag)`` (called in eval mode under ``torch.inference_mode``).
        Default: none."""
        return {}

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        """Optuna search space as config overrides (default: learning rate only)."""
        return {"lr": trial.suggest_float("lr", 1e-5, 1e-3, log=True)}

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, omics_dim={self.omics_dim}"
