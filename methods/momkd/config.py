"""MoMKD's settings (:class:`MoMKDCfg`) and its memory modes."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import MethodCfg

__all__ = ["MEMORY_MODES", "MoMKDCfg"]

#: how the memory moves; ``docs/momkd.md`` says what reaches it in each mode.
MEMORY_MODES = ("gradient", "momentum", "vq-ema", "fixed")


@dataclass
class MoMKDCfg(MethodCfg):
    """MoMKD settings; defaults are the reference code's (CAIR-LAB-WFUSM/MoMKD 226ad63).

    Sizes: ``MKD.__init__`` defaults (Dw 256, E 256, S 128, K 4, classifier 128); ``RnaEncoder`` hidden 512
    and dropout 0.25; ``WsiEncoder`` heads 2, dropout 0.5 (features and attention); head dropout 0.5.
    Loss: ``train_mkd``'s ``train_hparams`` (0.5 CE, 0.05 omics alignment, 0.2 WSI alignment, 0.05
    reconstruction, margin 0.3), ``alpha_mem = 0.1`` in ``mkd_train_loop``, LogSumExp scale 5 and softplus
    sharpness 20 in ``PrototypicalAlignmentLoss``, orthogonality weight 10 on the VectorQuantize memories.
    Memory: ``ema_update=False``, so AdamW trains the codebooks (``memory_mode="gradient"``, the default:
    the authors' code; the paper's "momentum-updated memory" is the named variant ``momentum-memory``);
    k-means on up to 50,000 patches per class, 20 iterations (``bootstrap_codebooks``); learnable log τ,
    init 0.2. The memory-mode and adaptive-size settings (``ema_decay`` ... ``split_threshold``) are bench's
    own (the code has no counterpart): they only act in the modes that name them.
    Training: AdamW lr 2e-4 (``main.py``), weight decay 1e-4 (hard-coded in ``train_mkd``), ReduceLROnPlateau
    (max, factor 0.2, patience 5) on val AUC, grad-norm clip 16 (``run.sh``: ``--gc 16``), class-balanced
    sampling with replacement, up to 100 epochs (``run.sh``), early stopping on val AUC with ``main.py``'s
    defaults patience 20 and stop epoch 50 (``run.sh`` sets 1 and 1, a debugging setting; not used); its
    CLAM-style ``EarlyStopping`` stops only at an epoch index above ``stop_epoch``, so ``min_epochs=52``;
    it counts only ``score < best`` as worse, so a tied validation AUC becomes the new best
    (``keep_tied_best``). It is always on: ``main.py``'s ``--early_stopping`` flag is never read.
    """

    wsi_dim: int = 256  # Dw, width of the graph encoder
    omics_hidden_dim: int = 512
    omics_embed_dim: int = 256  # E, width of the omics embedding
    shared_dim: int = 128  # S, the spherical space
    memory_size: int = 4  # K, components per class
    cls_hidden_dim: int = 128
    heads: int = 2
    dropout: float = 0.5  # graph encoder features and classifier head
    attn_dropout: float = 0.5  # GATv2 attention coefficients
    omics_dropout: float = 0.25
    memory_mode: str = "gradient"  # gradient | momentum | vq-ema | fixed
    #: momentum: decay of the momentum copy; vq-ema: decay of the running counts and sums (per optimiser step)
    ema_decay: float = 0.99
    ema_omics_weight: float = 1.0  # vq-ema: mass of the patient's omics embedding (a slide's patches: 1)
    ema_epsilon: float = 1e-5  # vq-ema: Laplace smoothing of the running counts
    dead_code_threshold: float = 0.1  # vq-ema: re-seed a code whose count is below this × its class's mean
    adaptive_memory: bool = False  # prune components whose use stays below active_threshold
    prune_patience: int = 3  # adaptive: epochs in a row below active_threshold before a component is pruned
    split_threshold: float = 0.0  # adaptive: split a component above this share into a free slot (0: never)
    kmeans_patches: int = 50_000  # per class (paper: 10,000)
    kmeans_iters: int = 20
    tau_init: float = 0.2
    learn_tau: bool = True  # paper: fixed τ = 0.2
    margin: float = 0.3
    lse_scale: float = 5.0
    softplus_beta: float = 20.0
    ortho_weight: float = 10.0
    active_threshold: float = 0.01  # a memory component is "active" above this share of its class's patches
    ce_weight: float = 0.5
    mem_weight: float = 0.1
    align_omics_weight: float = 0.05
    align_wsi_weight: float = 0.2
    recon_weight: float = 0.05  # paper: 0.01
    fast_graph: bool = True
    optimizer: str = "adamw"
    lr: float = 2e-4
    weight_decay: float = 1e-4
    scheduler: str = "plateau"
    plateau_factor: float = 0.2
    plateau_patience: int = 5
    epochs: int = 100
    patience: int = 20
    min_epochs: int = 52
    monitor: str = "auc"
    keep_tied_best: bool = True
    grad_clip: float | None = 16.0
    balanced_sampling: bool = True
    needs_graph: bool = True
    graph_k: int = 8
    graph_symmetric: bool = False
    uses_omics: bool = True
