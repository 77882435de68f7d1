"""WiKG: dynamic graph MIL with knowledge-aware attention (Li et al., CVPR 2024, arXiv 2403.07719).

Reference code: WonderLandxD/WiKG ``model.py`` and ``train.py`` (commit eb3144f).

The graph is built in feature space: every patch keeps its top-k "tail" patches by the head-tail similarity
``S = (e_h / sqrt(C)) e_t^T``. The reference materialises the N x N matrix and back-propagates through it
(O(N^2) memory). Here the top-k is found block by block without autograd, and only the selected
similarities are recomputed under autograd (only they carry gradient in the dense form too), inside a fused
block-wise operation that keeps its gates for the backward pass on small bags and recomputes them on large
ones: memory is linear in N, and the outputs and gradients are those of the dense form.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .base import Bag, MethodCfg, MILMethod, MILOutput
from .layers import Workspace
from .packing import pack_bags, segment_max, segment_mean, segment_pool, segment_softmax
from .registry import register_method

__all__ = ["WiKG", "WiKGCfg", "knowledge_attention", "topk_neighbours"]

AGGREGATIONS = ("bi-interaction", "gcn", "sage")
POOLS = ("mean", "max", "attn")
KNOWLEDGE_SCORES = ("code", "dot")


@dataclass
class WiKGCfg(MethodCfg):
    """Defaults of the official repo as its ``train.py`` runs them: C = 512, top-k 6, bi-interaction,
    mean pooling, dropout 0.3, Adam lr 1e-4, weight decay 1e-5, 100 epochs without early stopping,
    checkpoint of the best validation AUC (``if max_val_auc == val_auc`` saves, so a later tied epoch is the
    one kept: ``keep_tied_best``).

    ``knowledge_score``: ``code`` is what ``model.py`` computes, ``einsum('ijkl,ijkm->ijk', Nb_h, gate)``,
    which sums the two factors separately, ``(Σ_c e_t[j]) (Σ_c g_ij)``; ``dot`` is the paper's inner
    product ``<e_t[j], g_ij>`` (also MIL-Lab's).
    ``chunk_elements`` is an implementation setting (not the authors'): how many entries of the N x N
    similarity are held at once while searching the top-k.
    """

    hidden_dim: int = 512
    topk: int = 6
    agg_type: str = "bi-interaction"  # bi-interaction | gcn | sage
    pool: str = "mean"  # mean | max | attn
    knowledge_score: str = "code"  # code | dot
    dropout: float = 0.3
    epochs: int = 100
    patience: int = 100
    monitor: str = "auc"
    keep_tied_best: bool = True
    chunk_elements: int = 1 << 24


@torch.no_grad()
def topk_neighbours(e_h: Tensor, e_t: Tensor, k: int, scale: float, chunk_elements: int = 1 << 24) -> Tensor:
    """Indices of the ``k`` largest entries of each row of ``(e_h * scale) @ e_t^T``, one block of rows at a time.

    Self is not excluded (as the reference). ``k`` is capped at N.

    Shapes:
        e_h, e_t ``(N, C)`` -> ``(N, min(k, N))`` long.
    """
    n = e_h.shape[0]
    k = min(k, n)
    rows = max(1, chunk_elements // max(n, 1))
    out = torch.empty(n, k, dtype=torch.long, device=e_h.device)
    tail = e_t.t()
    for first in range(0, n, rows):
        logits = (e_h[first : first + rows] * scale) @ tail  # (rows, N)
        out[first : first + rows] = logits.topk(k, dim=-1).indices
    return out


class _KnowledgeAttention(torch.autograd.Function):
    """WiKG's neighbour aggregation for given top-k indices, block by block, recomputed in backward.

    Per node i with neighbours j (``nb_j = e_t[j]``):
    ``w_j = <e_h[i] * scale, nb_j>``, ``p = softmax(w)``, ``g_j = tanh((2 - p_j) e_h[i] + p_j nb_j)``
    (that is ``tanh(e_h + r)`` with ``r = p nb + (1 - p) e_h``), knowledge score ``s_j`` (``code``:
    ``sum(nb_j) sum(g_j)``; ``dot``: ``<nb_j, g_j>``), ``a = softmax(s)``, output ``Σ_j a_j nb_j``.
    Every block works in a few block-sized buffers (``out=`` and in-place ops, no large temporaries). With
    ``store`` the gates ``g`` (``N x k x C``) and the ``(N, k)`` factors are kept for the backward pass;
    without it nothing of size ``N x k x C`` is kept and the backward pass recomputes each block's forward
    (the same values; at N = 350 that recomputation was about a tenth of the training step).
    """

    @staticmethod
    def _block(
        eh: Tensor,
        block_index: Tensor,
        e_t: Tensor,
        scale: float,
        dot: bool,
        nb_buf: Tensor,
        g_buf: Tensor,
        scratch: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor]:
        """Forward of one block of B rows: ``(nb, p, g, sum(nb), sum(g), a)`` (sums only for ``code``)."""
        b, k = block_index.shape
        nb = torch.index_select(e_t, 0, block_index.reshape(-1), out=nb_buf[:b].view(b * k, -1)).view(
            b, k, -1
        )
        p = torch.mul(nb, (eh * scale).unsqueeze(1), out=scratch[:b]).sum(-1).softmax(-1)  # (B, k)
        g = torch.mul(nb, p.unsqueeze(-1), out=g_buf[:b])
        g = g.addcmul_(eh.unsqueeze(1), (2 - p).unsqueeze(-1)).tanh_()  # (B, k, C)
        if dot:
            nb_sum = g_sum = None
            score = torch.mul(nb, g, out=scratch[:b]).sum(-1)
        else:
            nb_sum, g_sum = nb.sum(-1), g.sum(-1)
            score = nb_sum * g_sum
        return nb, p, g, nb_sum, g_sum, score.softmax(-1)

    @staticmethod
    def forward(
        ctx: Any,
        e_h: Tensor,
        e_t: Tensor,
        index: Tensor,
        scale: float,
        dot: bool,
        rows: int,
        store: bool,
        workspace: Workspace | None,
    ) -> Tensor:
        out = torch.empty_like(e_h)
        shape = (rows, *index.shape[1:], e_h.shape[1])
        nb_buf, g_buf, scratch = _buffers(e_h, shape, 3, workspace)
        # with ``store``, the gates g and the small per-edge factors are kept for the backward pass
        g_all = e_h.new_empty(*index.shape, e_h.shape[1]) if store else None
        kept: list[tuple[Tensor, ...]] = []
        for first in range(0, e_h.shape[0], rows):
            eh, block_index = e_h[first : first + rows], index[first : first + rows]
            g_out = g_buf if g_all is None else g_all[first : first + rows]
            nb, p, _, nb_sum, g_sum, a = _KnowledgeAttention._block(
                eh, block_index, e_t, scale, dot, nb_buf, g_out, scratch
            )
            if store:
                kept.append(tuple(t for t in (p, a, nb_sum, g_sum) if t is not None))
            torch.sum(
                torch.mul(nb, a.unsqueeze(-1), out=scratch[: len(block_index)]),
                1,
                out=out[first : first + rows],
            )
        saved = [g_all, *(torch.cat(parts) for parts in zip(*kept, strict=True))] if store else []
        ctx.save_for_backward(e_h, e_t, index, *saved)
        ctx.scale, ctx.dot, ctx.rows, ctx.workspace = scale, dot, rows, workspace
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        e_h, e_t, index, *stored = ctx.saved_tensors
        scale, dot, rows = ctx.scale, ctx.dot, ctx.rows
        grad_out = grad_out.to(e_h.dtype)
        grad_h = torch.empty_like(e_h)
        grad_t = torch.zeros_like(e_t)
        one = torch.ones((), dtype=e_h.dtype, device=e_h.device)
        shape = (rows, *index.shape[1:], e_h.shape[1])
        nb_buf, g_buf, scratch, gn_buf = _buffers(e_h, shape, 4, ctx.workspace)
        for first in range(0, e_h.shape[0], rows):
            eh, block_index, go = (
                e_h[first : first + rows],
                index[first : first + rows],
                grad_out[first : first + rows],
            )
            b = len(block_index)
            if stored:  # the forward's gates and factors; only the neighbours are gathered again
                block = [t[first : first + rows] for t in stored]
                k = block_index.shape[1]
                nb = torch.index_select(e_t, 0, block_index.reshape(-1), out=nb_buf[:b].view(b * k, -1))
                nb = nb.view(b, k, -1)
                g, p, a = block[0], block[1], block[2]
                nb_sum, g_sum = (None, None) if dot else (block[3], block[4])
            else:
                nb, p, g, nb_sum, g_sum, a = _KnowledgeAttention._block(
                    eh, block_index, e_t, scale, dot, nb_buf, g_buf, scratch
                )
            spent = g_buf[:b]  # scratch for the last products (g itself when it was recomputed there)
            grad_a = torch.mul(nb, go.unsqueeze(1), out=scratch[:b]).sum(-1)  # (B, k)
            grad_s = a * (grad_a - (a * grad_a).sum(-1, keepdim=True))  # through the softmax over k
            grad_nb = torch.mul(go.unsqueeze(1), a.unsqueeze(-1), out=gn_buf[:b])  # (B, k, C)
            grad_u = torch.addcmul(one, g, g, value=-1, out=scratch[:b])  # tanh' = 1 - g^2
            if dot:
                grad_nb.addcmul_(g, grad_s.unsqueeze(-1))
                grad_u.mul_(nb).mul_(grad_s.unsqueeze(-1))
            else:
                grad_nb.add_((grad_s * g_sum).unsqueeze(-1))
                grad_u.mul_((grad_s * nb_sum).unsqueeze(-1))
            grad_nb.addcmul_(grad_u, p.unsqueeze(-1))
            grad_p = torch.sub(nb, eh.unsqueeze(1), out=spent).mul_(grad_u).sum(-1)
            grad_w = p * (grad_p - (p * grad_p).sum(-1, keepdim=True))  # through the softmax over k
            through_u = torch.mul(grad_u, (2 - p).unsqueeze(-1), out=spent).sum(1)
            through_w = torch.mul(nb, grad_w.unsqueeze(-1), out=spent).sum(1)
            grad_h[first : first + rows] = through_u + scale * through_w
            grad_nb.addcmul_(eh.unsqueeze(1), (scale * grad_w).unsqueeze(-1))
            grad_t.index_add_(0, block_index.reshape(-1), grad_nb.view(-1, grad_nb.shape[-1]))
        return grad_h, grad_t, None, None, None, None, None, None


def _buffers(
    like: Tensor, shape: tuple[int, ...], count: int, workspace: Workspace | None
) -> tuple[Tensor, ...]:
    """The block buffers of one pass: from ``workspace``, or fresh."""
    if workspace is None:
        return tuple(like.new_empty(shape) for _ in range(count))
    return workspace.buffers(like, shape, count)


def knowledge_attention(
    e_h: Tensor,
    e_t: Tensor,
    index: Tensor,
    scale: float,
    score: str = "code",
    block_elements: int = 1 << 18,
    store_elements: int = 1 << 22,
    workspace: Workspace | None = None,
) -> Tensor:
    """WiKG's knowledge-aware neighbour embedding ``e_N`` for top-k ``index``, differentiable in e_h, e_t.

    Up to ``store_elements`` entries of ``N x k x C`` (the built-in bags: N up to ~1.3k at k = 6, C = 512),
    the forward's gates are kept for the backward pass instead of being recomputed (the same values); above
    it memory stays linear in N with a small constant. ``workspace`` keeps the block buffers between calls.

    Shapes:
        e_h, e_t ``(N, C)``, index ``(N, k)`` -> ``(N, C)``.
    """
    if score not in KNOWLEDGE_SCORES:
        raise ValueError(f"knowledge score {score!r} is not one of {KNOWLEDGE_SCORES}")
    e_t = e_t.to(e_h.dtype)
    rows = max(1, block_elements // (index.shape[1] * e_h.shape[1]))
    needs_grad = torch.is_grad_enabled() and (e_h.requires_grad or e_t.requires_grad)
    store = needs_grad and index.numel() * e_h.shape[1] <= store_elements
    return _KnowledgeAttention.apply(e_h, e_t, index, scale, score == "dot", rows, store, workspace)


@register_method("wikg")
class WiKG(MILMethod):
    r"""WiKG: patches as a knowledge graph with dynamic head-to-tail edges.

    .. math::
        x &= \mathrm{LeakyReLU}(W_0 x),\quad x \leftarrow (x + \bar x)/2,\quad e_h = W_h x,\ e_t = W_t x \\
        \mathcal N(i) &= \mathrm{topk}_j\, \langle e_h[i]/\sqrt C, e_t[j]\rangle,\quad
        p_{ij} = \mathrm{softmax}_j,\quad r_{ij} = p_{ij} e_t[j] + (1 - p_{ij}) e_h[i] \\
        g_{ij} &= \tanh(e_h[i] + r_{ij}),\quad \alpha_{ij} = \mathrm{softmax}_j(s_{ij}),\quad
        e_N[i] = \textstyle\sum_j \alpha_{ij} e_t[j] \\
        h &= \mathrm{LeakyReLU}(W_1(e_h + e_N)) + \mathrm{LeakyReLU}(W_2(e_h \odot e_N))
        \quad\text{(bi-interaction)} \\
        \hat y &= W_c\, \mathrm{LN}(\mathrm{pool}_n \mathrm{Dropout}(h_n))

    with :math:`s_{ij} = (\sum_c e_t[j]_c)(\sum_c g_{ij,c})` as the code computes, or the paper's
    :math:`\langle e_t[j], g_{ij}\rangle` (variant ``dot-score``). Aggregation variants ``gcn``
    (:math:`\mathrm{LeakyReLU}(W(e_h + e_N))`) and ``sage`` (:math:`\mathrm{LeakyReLU}(W[e_h; e_N])`);
    pooling: mean (``train.py``), or gated attention ``Linear(C, C/2)-LeakyReLU-Linear(C/2, 1)`` with a
    softmax over patches (``model.py``'s class default, variant ``attn-pool``). PyTorch's default
    initialisation, as the reference. The reference's unused ``gate_U/V/W`` layers are left out
    (394,240 parameters at C = 512 that never receive gradient).

    Variant ``mil-lab``: MIL-Lab's settings (top-k 4, attention pooling, dropout 0.25, dot score); its other
    changes (dropout after the patch embedding, no :math:`(1 - p) e_h` term, its initialisation) are not
    reproduced.
    """

    cfg_class = WiKGCfg
    variants = {
        "attn-pool": {"pool": "attn"},
        "gcn": {"agg_type": "gcn"},
        "sage": {"agg_type": "sage"},
        "dot-score": {"knowledge_score": "dot"},
        "mil-lab": {"topk": 4, "pool": "attn", "dropout": 0.25, "knowledge_score": "dot"},
    }
    ablations = {
        "ablation": [
            ("Bi-interaction, mean pooling (train.py)", ""),
            ("Attention pooling (model.py default)", "attn-pool"),
            ("GCN aggregation", "gcn"),
            ("GraphSAGE aggregation", "sage"),
            ("Dot-product knowledge score (paper)", "dot-score"),
        ]
    }
    summary = (
        "WSI-only graph MIL: dynamic top-k graph in feature space, knowledge-aware attention, mean pooling as "
        "its train.py; chunked top-k, memory linear in N"
    )
    paper = "Li et al., CVPR 2024"
    paper_url = "https://arxiv.org/abs/2403.07719"
    code_url = "https://github.com/WonderLandxD/WiKG"
    code_commit = "eb3144fb8267f525c57e71ced5c5b2b6a1c42a93"

    def __init__(self, cfg: WiKGCfg, in_dim: int, omics_dim: int | None = None) -> None:
        super().__init__(cfg, in_dim, omics_dim)
        for name, value, allowed in (
            ("agg_type", cfg.agg_type, AGGREGATIONS),
            ("pool", cfg.pool, POOLS),
            ("knowledge_score", cfg.knowledge_score, KNOWLEDGE_SCORES),
        ):
            if value not in allowed:
                raise ValueError(f"WiKG {name}={value!r} is not one of {allowed}")
        c = cfg.hidden_dim
        self.scale = c**-0.5
        self.embed = nn.Sequential(nn.Linear(in_dim, c), nn.LeakyReLU())
        self.w_head = nn.Linear(c, c)
        self.w_tail = nn.Linear(c, c)
        if cfg.agg_type == "bi-interaction":
            self.linear1, self.linear2 = nn.Linear(c, c), nn.Linear(c, c)
        else:
            self.linear = nn.Linear(2 * c if cfg.agg_type == "sage" else c, c)
        self.activation = nn.LeakyReLU()
        self.message_dropout = nn.Dropout(cfg.dropout)
        self.attention = (
            nn.Sequential(nn.Linear(c, c // 2), nn.LeakyReLU(), nn.Linear(c // 2, 1))
            if cfg.pool == "attn"
            else None
        )
        self.norm = nn.LayerNorm(c)
        self.classifier = nn.Linear(c, cfg.num_classes)
        self._workspace = Workspace()  # the knowledge attention's block buffers, kept between steps

    def _aggregate(self, e_h: Tensor, e_n: Tensor) -> Tensor:
        if self.cfg.agg_type == "bi-interaction":
            return self.activation(self.linear1(e_h + e_n)) + self.activation(self.linear2(e_h * e_n))
        if self.cfg.agg_type == "gcn":
            return self.activation(self.linear(e_h + e_n))
        return self.activation(self.linear(torch.cat([e_h, e_n], dim=-1)))

    def forward(self, bag: Bag) -> MILOutput:
        cfg = self.cfg
        x = self.embed(bag.features)  # (N, C)
        x = (x + x.mean(dim=0, keepdim=True)) * 0.5
        e_h, e_t = self.w_head(x), self.w_tail(x)  # (N, C) each
        index = topk_neighbours(e_h, e_t, cfg.topk, self.scale, cfg.chunk_elements)  # (N, k)
        e_n = knowledge_attention(
            e_h, e_t, index, self.scale, cfg.knowledge_score, workspace=self._workspace
        )  # (N, C)
        h = self.message_dropout(self._aggregate(e_h, e_n))  # (N, C)
        attention = None
        if cfg.pool == "attn":
            attention = self.attention(h).squeeze(-1).softmax(dim=0)  # (N,)
            pooled = attention.to(h.dtype) @ h
        elif cfg.pool == "max":
            pooled = h.max(dim=0).values
        else:
            pooled = h.mean(dim=0)
        slide = self.norm(pooled)  # (C,)
        return MILOutput(logits=self.classifier(slide), embedding=slide, attention=attention)

    def predict_logits(self, bags: Sequence[Bag]) -> Tensor:
        """The bags in one packed forward: per-patch maps on all patches; the top-k search, the patch mean
        and the pooling per bag (a bag with fewer than ``topk`` patches, whose neighbour table is narrower,
        alone through :meth:`forward`)."""
        cfg = self.cfg
        packable = [i for i, b in enumerate(bags) if b.num_patches >= cfg.topk]
        rows: dict[int, Tensor] = {
            i: self(bag).logits for i, bag in enumerate(bags) if bag.num_patches < cfg.topk
        }
        if packable:
            packed = pack_bags([bags[i] for i in packable])
            x = self.embed(packed.features)  # (T, C)
            x = (x + segment_mean(x, packed)[packed.segment]) * 0.5
            e_h, e_t = self.w_head(x), self.w_tail(x)
            index = torch.cat(
                [
                    topk_neighbours(e_h[s], e_t[s], cfg.topk, self.scale, cfg.chunk_elements) + s.start
                    for s in packed.slices()
                ]
            )  # (T, k), indices into the packed patches
            e_n = knowledge_attention(e_h, e_t, index, self.scale, cfg.knowledge_score)
            h = self.message_dropout(self._aggregate(e_h, e_n))  # (T, C)
            if cfg.pool == "attn":
                a = segment_softmax(self.attention(h).squeeze(-1), packed)
                pooled = segment_pool(a.to(h.dtype), h, packed)
            elif cfg.pool == "max":
                pooled = segment_max(h, packed)
            else:
                pooled = segment_mean(h, packed)
            logits = self.classifier(self.norm(pooled))  # (B', classes)
            rows.update(zip(packable, logits, strict=True))
        return torch.stack([rows[i] for i in range(len(bags))])

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        return {
            "lr": trial.suggest_float("lr", 1e-5, 1e-3, log=True),
            "topk": trial.suggest_categorical("topk", [4, 6, 8]),
        }
