"""TDC's stage-2 loss pieces (Xing et al.'s ``KD_loss.py``, ``CL_utils/CRD_loss.py``, ``AEKD_loss``), as pure
functions of tensors: logit KD, the two contrastive forms, the positive ranks, the self-EMA weight and the
gradient-guided (GK-Refine) weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kd_kl(z_s: Tensor, z_t: Tensor, temperature: float) -> Tensor:
    r"""Logit KD of ``KD_loss.DistillKL``: :math:`T^2\,\mathrm{KL}(\mathrm{softmax}(z_t/T)\,\|\,
    \mathrm{softmax}(z_s/T))` for one slide. Shapes: ``(C,)``, ``(C,)`` -> scalar."""
    return F.kl_div(
        F.log_softmax(z_s / temperature, -1), F.softmax(z_t / temperature, -1), reduction="sum"
    ) * (temperature**2)


def discrepancy_contrastive_loss(q: Tensor, keys: Tensor, num_pos: int, temperature: float) -> Tensor:
    r"""Supervised InfoNCE of the student query over teacher keys, positives first.

    :math:`L = -\frac{1}{P}\sum_{p<P} \log \frac{\exp(q\cdot k_p/\tau)}{\sum_j \exp(q\cdot k_j/\tau)}`.

    Shapes: ``q`` ``(d,)`` and ``keys`` ``(P + K, d)``, both L2-normalised -> scalar.
    """
    log_prob = (keys @ q / temperature).log_softmax(0)
    return -log_prob[:num_pos].mean()


def nce_contrast_loss(scores: Tensor, num_pos: int, n_data: int, z: Tensor, temperature: float) -> Tensor:
    r"""CRD's NCE form (``ContrastLoss_v2`` over ``ContrastMemory_v3``'s scores), positives first.

    :math:`P_j = \exp(s_j/\tau) / Z`, :math:`m` = number of negatives, :math:`P_n = 1/n_{data}`:

    .. math::
        L = -\Big[\frac1P \sum_{p<P} \log\frac{P_p}{P_p + m P_n + \epsilon}
            + \sum_{j \ge P} \log\frac{m P_n}{P_j + m P_n + \epsilon}\Big],\quad \epsilon = 10^{-7}

    (per sample as the reference at its batch size 16; with a batch of one its ``squeeze`` would sum the
    positives instead of averaging them). ``z`` is the normalisation constant the memory fixes on its first
    call, :math:`Z = \overline{\exp(s/\tau)}\, n_{data}`.

    Shapes: ``scores`` ``(P + m,)`` cosines, ``z`` ``()`` -> scalar.
    """
    out = (scores / temperature).exp() / z
    m = scores.shape[0] - num_pos
    noise = m / n_data
    log_d1 = (out[:num_pos] / (out[:num_pos] + noise + 1e-7)).log()
    log_d0 = (noise / (out[num_pos:] + noise + 1e-7)).log()
    return -(log_d1.mean() + log_d0.sum())


def mid_ranks(n: int, k: int, generator: torch.Generator | None = None) -> Tensor:
    """``select_pos_mode="mid"`` scaled to a bank of ``n`` candidates: ``k`` distinct ranks drawn at random from
    the band ``[n // 10, max(n // 10 + 1, n // 3))`` (the reference draws 20 of ranks 30..99 of its 300 sampled
    positives, the 10 %-33 % band), as many as the band holds when it holds fewer."""
    lo = n // 10
    hi = min(n, max(lo + 1, n // 3))
    return lo + torch.randperm(max(0, hi - lo), generator=generator)[: max(0, min(k, hi - lo))]


def ema_alpha(step: int, decay: float) -> float:
    """Weight of the old value in the self-EMA teacher's update ``ema = a * ema + (1 - a) * student`` after
    optimiser step ``step`` (0-based): ``min(1 - 1 / (step + 1), decay)`` (``update_ema_variables``: the
    true average until the exponential one is more correct)."""
    return min(1.0 - 1.0 / (step + 1), decay)


def gradient_refine_weights(kd_grads: Tensor, ce_grad: Tensor, mode: str) -> Tensor:
    r"""GK-Refine weights of the KD terms from their gradients on the student's slide feature.

    ``aekd`` (``AEKD_loss``, what the README's stage-2 run executes): :math:`w_i = n \sum_{j \in KD \cup
    \{CE\}} \cos(g_i, g_j)` with n the number of KD terms (``--CE_grads``: CE's gradient is in the sum).
    ``mask`` (``AEKD_loss_v2``, commented out at its call site): :math:`w_i = [\cos(g_i, g_{CE}) > 0]`.

    Shapes: ``kd_grads`` ``(n, d)``, ``ce_grad`` ``(d,)`` -> ``(n,)`` (no gradient).
    """
    unit = F.normalize(torch.cat((kd_grads, ce_grad.unsqueeze(0))).float(), dim=1)  # zero stays zero
    cos = unit[:-1] @ unit.T  # (n, n + 1)
    if mode == "mask":
        return (cos[:, -1] > 0).float()
    if mode == "aekd":
        return kd_grads.shape[0] * cos.sum(1)
    raise ValueError(f"unknown refine mode {mode!r}; use 'aekd', 'mask' or 'none'")
