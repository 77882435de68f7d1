"""MoMKD: genomics-to-pathology distillation through a class-conditional memory (Guo et al., CVPR 2026).

Paper: "Momentum Memory for Knowledge Distillation in Computational Pathology", arXiv 2602.21395.
Reference code: CAIR-LAB-WFUSM/MoMKD at 226ad63 (``models/mkd.py``, ``utils/Mkd_train_utils.py``,
``utils/core_utils.py``, the vendored ``vq/`` VectorQuantize it configures). Every place where paper and code
disagree is a named variant; ``docs/momkd.md`` lists them.

Modules: ``config`` (:class:`MoMKDCfg`, the authors' defaults), ``memory`` (the class memories: k-means,
alignment, commitment and orthogonality terms, and how the memories move), ``model`` (:class:`MoMKD`).
"""

from .config import MEMORY_MODES as MEMORY_MODES
from .config import MoMKDCfg as MoMKDCfg
from .memory import _orthogonality as _orthogonality
from .memory import soft_angle_loss as soft_angle_loss
from .memory import spherical_kmeans as spherical_kmeans
from .model import MoMKD as MoMKD

__all__ = ["MEMORY_MODES", "MoMKD", "MoMKDCfg", "soft_angle_loss", "spherical_kmeans"]
