"""TDC as this benchmark reads it: a frozen multimodal teacher distilled into a WSI-only ABMIL student.

The MoMKD paper lists "TDC" (gradient distillation) as a multimodal KD baseline, but its original could not
be identified: THIS IS AN ASSUMED SPECIFICATION, NOT A REPRODUCTION. It follows Xing et al., MICCAI 2022,
"Discrepancy and Gradient-guided Multi-modal Knowledge Distillation for Pathological Glioma Grading",
reference code CityU-AIM-Group/MultiModal-learning at 99b46b0 (``MICCAI-2022/train_test_MT.py``,
``train_test_path_multi_distill.py``, ``CL_utils/CRD_loss.py``, ``CL_utils/memory_new.py``,
``KD_loss.py``, ``networks_new.py``, ``options.py`` and the README's commands), adapted to MIL.

Why "TDC" is not pinned (searched 2026-12-01 with the stored-corpus tools: pages, docs, code and issues, for
the MoMKD paper's baselines, "TDC" with knowledge distillation / pathology / genomics / gradient distillation,
and Xing et al.'s titles): the stored copy of the paper's HTML (arxiv.org/html/2602.21395, v3) is returned
only from its opening (title, authors, abstract), never its experiments section or reference list; no
stored page, repository or issue names a pathology or multimodal KD method "TDC"; the MoMKD repository
(CAIR-LAB-WFUSM/MoMKD 226ad63) has no baseline code and names none. The closest public code that matches
the summaries' "gradient distillation" is Xing et al.'s gradient-guided KD, implemented here.

Modules: ``losses`` (the stage-2 loss pieces as pure functions), ``teacher`` (:class:`TDCCfg` and the stage-1
multimodal teacher), ``model`` (:class:`TDC`).
"""

from .losses import discrepancy_contrastive_loss as discrepancy_contrastive_loss
from .losses import ema_alpha as ema_alpha
from .losses import gradient_refine_weights as gradient_refine_weights
from .losses import kd_kl as kd_kl
from .losses import mid_ranks as mid_ranks
from .losses import nce_contrast_loss as nce_contrast_loss
from .model import TDC as TDC
from .teacher import TDCCfg as TDCCfg

__all__ = [
    "TDC",
    "TDCCfg",
    "discrepancy_contrastive_loss",
    "ema_alpha",
    "gradient_refine_weights",
    "kd_kl",
    "mid_ranks",
    "nce_contrast_loss",
]
