"""G-HANet: histo-genomic knowledge association by omics reconstruction (Wang et al., IEEE TMI 2025).

"Histo-Genomic Knowledge Association for Cancer Prognosis from Histopathology Whole Slide Images",
arXiv 2403.10040. Reference code: ZacharyWang-007/G-HANet at 54020e8 (``models/model_coattn.py``,
``models/model_reconstruction.py``, ``models/attention_modules.py``, ``models/hyper_attention_module.py``,
``utils/coattn_train_utils.py``, ``utils/core_utils.py``, ``main.py``).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import ttest_ind
from torch import Tensor, nn

from .base import Bag, DataNeeds, MethodCfg, MILMethod, MILOutput
from .layers import GatedAttention
from .packing import PackedBags, pack_bags, pad_segments, padding_mask
from .registry import register_method

__all__ = ["GHANet", "GHANetCfg", "hyperedge_weights", "sce_loss", "welch_gene_mask"]


def sce_loss(x: Tensor, y: Tensor, alpha: float = 3.0, reduction: str = "mean") -> Tensor:
    r"""Scaled cosine error of ``coattn_train_utils.sce_loss``: :math:`\mathrm{mean}((1 - \cos(x, y))^\alpha)`
    along the last axis (``reduction="sum"``: the sum over rows, for a window of slides).

    Shapes: ``(..., G)``, ``(..., G)`` -> scalar.
    """
    cos = (F.normalize(x, dim=-1) * F.normalize(y, dim=-1)).sum(-1)
    err = (1 - cos).pow(alpha)
    return err.sum() if reduction == "sum" else err.mean()


def welch_gene_mask(omics: np.ndarray, labels: np.ndarray, p_threshold: float) -> np.ndarray:
    """Genes whose two classes differ by Welch's t-test (``ttest_ind(equal_var=False)``), p < ``p_threshold``.

    With more than two classes (bench's extension; the authors' code is binary): a gene is kept when one
    class differs from the rest, one-vs-rest Welch tests, any p < ``p_threshold`` (a class with fewer than
    two patients, or with every patient, takes no part).

    Args:
        omics: ``(P, G)`` gene values of the training patients.
        labels: ``(P,)`` class index (0 / 1 for two classes).
    Returns:
        ``(G,)`` boolean mask; all False when a class has fewer than two patients; a gene with an undefined
        p-value (constant in both classes) is not selected.
    """
    if labels.size and labels.max() > 1:
        masks = [welch_gene_mask(omics, (labels == c).astype(int), p_threshold) for c in np.unique(labels)]
        return np.logical_or.reduce(masks)
    a, b = omics[labels == 0], omics[labels == 1]
    if len(a) < 2 or len(b) < 2:
        return np.zeros(omics.shape[1], dtype=bool)
    with warnings.catch_warnings():  # constant genes: scipy warns, and their p-value is NaN (handled below)
        warnings.simplefilter("ignore", RuntimeWarning)
        p = ttest_ind(a, b, axis=0, equal_var=False).pvalue
    return np.nan_to_num(p, nan=1.0) < p_threshold


@torch.no_grad()
def hyperedge_weights(sim: Tensor, ratio: float, sizes: Sequence[int] | None = None) -> Tensor:
    """Detached hyperedge weights of ``G_HANet_Surv.forward``: scores averaged over heads, each token's
    hyperedge = its top ``int(N * ratio)`` patches (at least one), softmax of the scores over the hyperedge.

    Shapes: ``(H, T, N)`` -> ``(T, N)``, rows summing to one, zero outside the hyperedge; or a padded window
    ``(B, H, T, N_max)`` whose scores past bag b's ``sizes[b]`` patches are ``-inf`` -> ``(B, T, N_max)``,
    each bag's hyperedges of its own top ``int(sizes[b] * ratio)`` patches.
    """
    s = sim.mean(-3)
    ks = [max(1, int(m * ratio)) for m in ([s.shape[-1]] if sizes is None else sizes)]
    top = s.topk(max(ks), dim=-1).values  # (..., T, k_max)
    last = torch.tensor(ks, device=s.device) - 1  # each bag's k-th largest: its threshold
    threshold = top.gather(-1, last.view(-1, *([1] * (top.dim() - 1))).expand(*top.shape[:-1], 1))
    return s.masked_fill(s < threshold, float("-inf")).softmax(-1)


class _FeedForward(nn.Module):
    """GEGLU feed-forward of ``attention_modules.FeedForward``: Linear(d->2*4d), x*GELU(gate), Linear(4d->d),
    Dropout. Shapes: ``(..., d)`` -> ``(..., d)``."""

    def __init__(self, dim: int, dropout: float, mult: int = 4) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, dim * mult * 2)
        self.proj_out = nn.Sequential(nn.Linear(dim * mult, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(x * F.gelu(gate))


class _MultiHeadAttention(nn.Module):
    r"""Multi-head attention of ``attention_modules.Cross_Attention`` / ``Self_Attention``: bias-free q, k, v,
    dropout on the attention map, output Linear(h*dh -> h*dh).

    :meth:`attend_context` is the cross-attention over N patches with the key and value maps moved to the
    T queries (:math:`q_h \cdot W_{k,h} c_n = (W_{k,h}^\top q_h) \cdot c_n`,
    :math:`\sum_n a_{hn} W_{v,h} c_n = W_{v,h} \sum_n a_{hn} c_n`): the same products in another order, so
    the patches are never projected (2 T H d multiply-adds per patch and round instead of 2 d^2 per patch
    once: with G-HANet's T = 6 tokens, H = 4 heads, d = 512 and two rounds, about 10x fewer)."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head**-0.5
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, inner)
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(-3, -2)  # (..., n, h*dh) -> (..., h, n, dh)

    def keys_values(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """``(..., N, dim)`` -> keys and values ``(..., h, N, dh)``."""
        return self._split(self.to_k(context)), self._split(self.to_v(context))

    def attend(self, x: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Queries ``(..., T, dim)`` over keys/values ``(..., h, N, dh)`` -> output ``(..., T, h*dh)``,
        pre-softmax scaled scores ``(..., h, T, N)``."""
        sim = self._split(self.to_q(x)) @ k.transpose(-1, -2) * self.scale  # (..., h, T, N)
        out = self.dropout(sim.softmax(-1)) @ v  # (..., h, T, dh)
        return self.to_out(out.transpose(-3, -2).flatten(-2)), sim

    def attend_context(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`attend` of queries ``(..., T, dim)`` over ``to_k(context)``, ``to_v(context)`` for a
        context ``(B, N, dim)``, without projecting the context (see the class docstring); ``mask`` ``(B, N)``:
        the patches that exist (a padded window; the others score ``-inf``). Returns the output
        ``(B, T, h*dh)`` and the pre-softmax scaled scores ``(B, h, T, N)``."""
        h, t = self.heads, x.shape[-2]
        w_k = self.to_k.weight.view(h, -1, self.to_k.in_features)  # (h, dh, dim)
        w_v = self.to_v.weight.view(h, -1, self.to_v.in_features)
        # (einsum: one product per head over all bags, not a copy of the weights per bag)
        q = torch.einsum("...htd,hde->...hte", self._split(self.to_q(x)), w_k)  # (..., h, T, dim)
        sim = (q.flatten(-3, -2) @ context.transpose(-1, -2)).unflatten(-2, (h, t)) * self.scale
        if mask is not None:
            sim = sim.masked_fill(~mask[:, None, None, :], float("-inf"))
        attn = self.dropout(sim.softmax(-1))  # (B, h, T, N)
        pooled = (attn.flatten(-3, -2) @ context).unflatten(-2, (h, t))  # (B, h, T, dim)
        out = torch.einsum("bhte,hde->bhtd", pooled, w_v)  # (B, h, T, dh): the values' map after pooling
        return self.to_out(out.transpose(-3, -2).flatten(-2)), sim

    def forward(self, x: Tensor) -> Tensor:
        """Self-attention: ``(..., T, dim)`` -> ``(..., T, h*dh)``."""
        return self.attend(x, *self.keys_values(x))[0]


class _HyperAttention(nn.Module):
    r"""``Hyper_attention``: :math:`x' = G h`, :math:`y = \mathrm{ReLU}(\mathrm{LN}(W_2\,\mathrm{ReLU}(
    \mathrm{LN}(W_1 x')))) + x'`. Shapes: ``(..., N, d)``, hyperedges ``(..., T, N)`` -> ``(..., T, d)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, dim),
            nn.LayerNorm(dim),
            nn.ReLU(),
            nn.Linear(dim, dim),
            nn.LayerNorm(dim),
            nn.ReLU(),
        )

    def forward(self, h: Tensor, edges: Tensor) -> Tensor:
        x = edges @ h
        return self.net(x) + x


@dataclass
class _Window:
    """:meth:`GHANet._window` of B bags: logits ``(B, C)``, embeddings ``(B, T * 256)``, gated attention
    ``e_1`` ``(B, N_max)`` (zero past each bag's patches), token reconstructions ``r`` ``(B, T, 512)``."""

    logits: Tensor
    embedding: Tensor
    attention: Tensor
    tokens: Tensor


@dataclass
class GHANetCfg(MethodCfg):
    """Defaults from ``main.py`` and ``models/`` of ZacharyWang-007/G-HANet.

    Adam 2e-4, weight decay 1e-5, gradient accumulation 32 (``--gc``), 20 epochs, dropout 0.25, weighted
    sampling; the reference keeps the best validation epoch and never stops early (``patience`` = epochs),
    a strictly better one only (``c_index > c_index_best``). Its ``StepLR(30)`` never fires within 20 epochs:
    no scheduler. Accumulation as ``train_loop_survival_coattn``: each bag back-propagates ``loss / gc``
    (``accumulation_mean``: a window's gradient is the mean of its 32 bags', so under Adam the weight decay
    keeps its weight against it), the optimiser steps when ``(batch_idx + 1) % gc == 0`` and nothing zeroes
    the gradients between epochs, so a partial last window joins the next epoch's first one
    (``carry_partial_window``; the last epoch's remainder is never applied). bench runs each window (and the
    carried partial one) as one batched forward and backward (``batched_windows``, :meth:`GHANet.window_loss`):
    the same gradient as the code's 32 backward passes, the dropout masks drawn in another order.
    """

    optimizer: str = "adam"
    lr: float = 2e-4
    weight_decay: float = 1e-5
    epochs: int = 20
    patience: int = 20
    monitor: str = "auc"
    balanced_sampling: bool = True
    accumulation_steps: int = 32
    accumulation_mean: bool = True
    carry_partial_window: bool = True
    uses_omics: bool = True
    wsi_dim: int = 512
    num_tokens: int = 6  # --num_tokens: one per gene group
    heads: int = 4
    dim_head: int = 128
    compressed_dim: int = 256  # per-token Linear(512->256) before flattening
    hyperedge_ratio: float = 0.2  # --ratio: top 20 % patches of each token form its hyperedge
    recon_weight: float = 0.3
    sce_alpha: float = 3.0
    p_threshold: float = 0.05
    gene_groups: tuple[int, ...] | None = None  # group index (0..num_tokens-1) per gene; None = contiguous
    share_cross_attention: bool = True  # the code reuses cross_attention0 in round two
    #: one batched forward and backward per window of ``gc`` bags (``window_loss``); False: one bag at a
    #: time, as the code (the same gradient; the dropout masks drawn in the code's order)
    batched_windows: bool = True

    def needs(self) -> DataNeeds:
        """As every method's, plus the gene groups: the harness fills ``gene_groups`` from ``omics_groups``."""
        return dataclasses.replace(super().needs(), gene_groups=True)


@register_method("ghanet")
class GHANet(MILMethod):
    r"""Cross-modal association (omics reconstruction from H&E) plus hyper-attention, WSI-only at inference.

    Association branch (``Reconstruction_Net``): :math:`h = \mathrm{Drop}(\mathrm{ReLU}(W x))`, 6 learnable
    tokens t, two rounds of pre-LN token->patch cross-attention (4 heads x 128) with GEGLU feed-forward:

    .. math::
        r = A(\mathrm{LN}_1 t, \mathrm{LN}_2 h),\quad r \leftarrow \mathrm{FF}_0(\mathrm{LN}_3 r) + r

    .. math::
        r, S = A(\mathrm{LN}_4(t + r), \mathrm{LN}_2 h),\quad
        r \leftarrow \mathrm{LN}_6(\mathrm{FF}_1(\mathrm{LN}_5 r) + r)

    where the code uses the first module A in both rounds (default; variant ``separate-cross-attention`` gives
    round two its own, as the unused ``cross_attention1`` suggests). Token i decodes the selected genes of
    group i: :math:`\hat o_i = W_2\,\mathrm{Drop}(\mathrm{ELU}(\mathrm{LN}(W_1 r_i)))`.

    Hyper-attention branch: :math:`g = \mathrm{Drop}(\mathrm{ReLU}(\mathrm{LN}(W' x)))`, gated attention
    :math:`e_1 = \mathrm{softmax}_n(w(g))`; :math:`\bar S` = S averaged over heads, hyperedge i = the top 20 %
    patches of :math:`\bar S_i`, :math:`e_2 = sg(\mathrm{softmax}_n(\bar S \text{ masked to the hyperedge}))`;
    :math:`y = \mathrm{HyperAttn}(g, (e_1 + e_2)/2)`; fusion :math:`u = (y + r)/2`,
    :math:`u \leftarrow \mathrm{SA}(u) + u`, :math:`u \leftarrow \mathrm{FF}(\mathrm{LN}\,u) + u`, per-token
    Linear(512->256)-LN-ReLU-Drop, flatten, Linear -> logits.

    Loss: :math:`CE + 0.3 \sum_i [SCE(\hat o_i, o_i) + MSE(\hat o_i, o_i)]`, SCE = mean((1 - cos)^3), over the
    genes of group i selected by Welch's t-test p < 0.05 between the two classes of the training patients
    (:meth:`prepare`, each patient once; the reference tests its resampled training loader). Adaptation: the
    reference is a survival model (NLL hazard loss); here the head has ``num_classes`` logits and CE replaces
    the survival loss. Gene groups: ``gene_groups`` (the reference's six functional families, filled from a
    task's group file); without it the genes are split into ``num_tokens`` contiguous groups. Decoders are
    sized to whole groups and the loss reads the selected rows (same model as decoders of selected size, and
    the parameter set is fixed before :meth:`prepare`); a group with no selected gene has nothing to
    reconstruct and its decoder is frozen (the reference would build a 0-wide layer and a NaN MSE). Bags
    without omics train on CE alone.

    Computation (the same maths, reordered): the cross-attention's key and value maps are applied to the 6
    token queries instead of every patch (:meth:`_MultiHeadAttention.attend_context`), and a window of bags
    (training, ``gc`` = 32) or a chunk of bags (inference) runs in one forward: the per-patch maps on the
    packed patches, the token-level work batched over the bags, padded to the largest bag with the missing
    patches masked out of every softmax and hyperedge (each bag's own top 20 %).
    """

    cfg_class = GHANetCfg
    variants: ClassVar[dict[str, dict[str, Any]]] = {
        "separate-cross-attention": {"share_cross_attention": False}
    }
    summary = (
        "Omics-reconstruction KD with token cross-attention + hyper-attention; survival head replaced by "
        "2-class CE; each bag's loss / 32 (gc), partial window carried into the next epoch, as the code"
    )
    paper = "Wang et al., IEEE TMI 2025"
    paper_url = "https://arxiv.org/abs/2403.10040"
    code_url = "https://github.com/ZacharyWang-007/G-HANet"
    code_commit = "54020e8050ec3688f4485033f20f4b9077ee5f7e"

    def __init__(self, cfg: GHANetCfg, in_dim: int, omics_dim: int | None = None) -> None:
        super().__init__(cfg, in_dim, omics_dim)
        d, p = cfg.wsi_dim, cfg.dropout
        # association branch
        self.assoc_fc = nn.Sequential(nn.Linear(in_dim, d), nn.ReLU(), nn.Dropout(p))
        self.tokens = nn.Parameter(torch.randn(cfg.num_tokens, d))
        self.cross_attention = nn.ModuleList(
            _MultiHeadAttention(d, cfg.heads, cfg.dim_head, p)
            for _ in range(1 if cfg.share_cross_attention else 2)
        )
        self.ffn0, self.ffn1 = _FeedForward(d, p), _FeedForward(d, p)
        self.ln = nn.ModuleList(nn.LayerNorm(d) for _ in range(6))  # ln_1 .. ln_6 of the reference
        self.groups = self._gene_groups(cfg, omics_dim or 0)
        self.decoders = nn.ModuleList(
            nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d), nn.ELU(), nn.Dropout(p), nn.Linear(d, len(g)))
            for g in self.groups
        )
        for i, g in enumerate(self.groups):
            self.register_buffer(f"genes_{i}", torch.as_tensor(g, dtype=torch.long), persistent=False)
            self.register_buffer(f"selected_{i}", torch.zeros(len(g), dtype=torch.bool))
        # hyper-attention branch
        self.wsi_fc = nn.Sequential(nn.Linear(in_dim, d), nn.LayerNorm(d), nn.ReLU(), nn.Dropout(p))
        self.gate = GatedAttention(d, 256)
        self.hyper = _HyperAttention(d)
        self.self_attention = _MultiHeadAttention(d, cfg.heads, cfg.dim_head, p)
        self.ffn = _FeedForward(d, p)
        self.ln_fusion = nn.LayerNorm(d)
        self.compress = nn.Sequential(
            nn.Linear(d, cfg.compressed_dim), nn.LayerNorm(cfg.compressed_dim), nn.ReLU(), nn.Dropout(p)
        )
        self.classifier = nn.Linear(cfg.num_tokens * cfg.compressed_dim, cfg.num_classes)

    @staticmethod
    def _gene_groups(cfg: GHANetCfg, omics_dim: int) -> list[np.ndarray]:
        """Gene indices of each group (only non-empty groups get a decoder)."""
        if cfg.gene_groups is None:
            groups = np.array_split(np.arange(omics_dim), cfg.num_tokens)
        else:
            g = np.asarray(cfg.gene_groups)
            if g.shape != (omics_dim,) or g.min(initial=0) < 0 or g.max(initial=0) >= cfg.num_tokens:
                raise ValueError(
                    f"gene_groups must give a group in 0..{cfg.num_tokens - 1} for each of the "
                    f"{omics_dim} genes; got {g.size} entries in {g.min(initial=0)}..{g.max(initial=0)}"
                )
            groups = [np.flatnonzero(g == i) for i in range(cfg.num_tokens)]
        return [grp for grp in groups if len(grp)]

    def prepare(self, train_bags: Sequence[Bag]) -> None:
        """Welch t-test gene selection on the training patients with omics (each ``case_id`` once); the
        decoder of a group with no selected gene is frozen (it would get no gradient)."""
        seen: dict[str, Bag] = {}
        for i, b in enumerate(train_bags):
            if b.omics is not None:
                seen.setdefault(b.case_id or f"#{i}", b)
        if not seen:
            return
        omics = torch.stack([b.omics for b in seen.values()]).float().cpu().numpy()
        labels = np.array([int(b.label) for b in seen.values()])
        mask = torch.from_numpy(welch_gene_mask(omics, labels, self.cfg.p_threshold))
        for i, decoder in enumerate(self.decoders):
            sel = getattr(self, f"selected_{i}")
            sel.copy_(mask[getattr(self, f"genes_{i}").cpu()].to(sel.device))
            decoder.requires_grad_(bool(sel.any()))  # nothing to reconstruct: the decoder is unused

    def _window(self, packed: PackedBags) -> _Window:
        """The packed bags' forward: every patch-level map once on all their patches, the token-level work
        (both cross-attention rounds, the FFNs, hyperedges, hyper-attention, fusion, classifier) batched over
        the bags, padded to the largest with the missing patches masked out: each bag's values as alone."""
        ln, (first, second) = self.ln, (self.cross_attention[0], self.cross_attention[-1])
        x, sizes = packed.features, packed.sizes
        mask = None if packed.num_bags == 1 else padding_mask(packed)  # (B, N_max)
        context = pad_segments(ln[1](self.assoc_fc(x)), packed)  # (B, N_max, 512)
        r, _ = first.attend_context(ln[0](self.tokens), context, mask)  # (B, T, 512): one query set
        r = self.ffn0(ln[2](r)) + r
        r, sim = second.attend_context(ln[3](self.tokens + r), context, mask)  # and (B, H, T, N_max)
        r = ln[5](self.ffn1(ln[4](r)) + r)
        g = self.wsi_fc(x)  # hyper-attention branch: (T_all, 512)
        e1 = pad_segments(self.gate(g).squeeze(-1), packed, float("-inf")).softmax(-1)  # (B, N_max)
        e2 = hyperedge_weights(sim, self.cfg.hyperedge_ratio, sizes)  # (B, T, N_max), no gradient
        y = self.hyper(pad_segments(g, packed), (e1.unsqueeze(1) + e2) / 2)  # (B, T, 512)
        u = (y + r) / 2
        u = self.self_attention(u) + u
        u = self.ffn(self.ln_fusion(u)) + u
        z = self.compress(u).flatten(-2)  # (B, T * 256)
        return _Window(self.classifier(z), z, e1, r)

    def forward(self, bag: Bag) -> MILOutput:
        w = self._window(pack_bags([bag]))
        extras: dict[str, Any] = {}
        if self.training:
            extras["reconstruction"] = [dec(w.tokens[0, i]) for i, dec in enumerate(self.decoders)]
        return MILOutput(
            logits=w.logits[0], embedding=w.embedding[0], attention=w.attention[0], extras=extras
        )

    def predict_logits(self, bags: Sequence[Bag]) -> Tensor:
        """All bags in one batched forward (:meth:`_window`)."""
        return self._window(pack_bags(bags)).logits

    @property
    def batches_windows(self) -> bool:
        return self.cfg.batched_windows

    def window_loss(self, bags: Sequence[Bag]) -> dict[str, Tensor]:
        """The window's terms in one batched forward: the sums over its bags of :meth:`loss`'s (the trainer
        divides them by ``gc`` as each bag's). With dropout the masks are drawn in another order than bag by
        bag (one draw per layer for the whole window), so a run differs from the per-bag one by its dropout
        draws alone; without dropout the gradients are the same (``tests/methods/test_windows.py``)."""
        w = self._window(pack_bags(bags))
        recon = [dec(w.tokens[:, i]) for i, dec in enumerate(self.decoders)]  # (B, genes of group i) each
        return self._terms(w.logits, recon, bags)

    def loss(self, bag: Bag, out: MILOutput) -> dict[str, Tensor]:
        recon = out.extras.get("reconstruction")
        return self._terms(
            out.logits.unsqueeze(0), None if recon is None else [o[None] for o in recon], [bag]
        )

    def _terms(self, logits: Tensor, recon: list[Tensor] | None, bags: Sequence[Bag]) -> dict[str, Tensor]:
        """CE and the weighted reconstruction terms, each summed over the bags (the reconstruction over the
        bags with omics): logits ``(B, C)``, each group's reconstruction ``(B, genes of the group)``."""
        terms = {self.task_term: self.task_loss_sum(logits, bags)}
        rows = [i for i, b in enumerate(bags) if b.omics is not None]
        if not rows or recon is None:
            return terms
        omics = torch.stack([bags[i].omics for i in rows]).float()  # (B', G)
        keep = None if len(rows) == len(bags) else torch.tensor(rows, device=logits.device)
        sce, mse = [], []
        for i, o_hat in enumerate(recon):
            sel = getattr(self, f"selected_{i}")
            idx = getattr(self, f"genes_{i}")[sel]
            if idx.numel() == 0:
                continue
            pred = (o_hat if keep is None else o_hat[keep])[:, sel].float()
            target = omics[:, idx]
            sce.append(sce_loss(pred, target, self.cfg.sce_alpha, reduction="sum"))
            mse.append((pred - target).pow(2).mean(-1).sum())  # each slide's F.mse_loss, summed
        if sce:
            terms["sce"] = self.cfg.recon_weight * torch.stack(sce).sum()
            terms["mse"] = self.cfg.recon_weight * torch.stack(mse).sum()
        return terms

    def training_report(self) -> dict[str, Any]:
        return {
            "selected_genes_per_group": [
                int(getattr(self, f"selected_{i}").sum()) for i in range(len(self.groups))
            ]
        }
