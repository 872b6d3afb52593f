"""Knowledge Factorization: the method (IMB objective), the brick store, the evaluation report, representation
analysis."""

from . import (
    amalgamate,  # noqa: F401  (registers kf_amalgamate and kf_extend)
    bricks,  # noqa: F401  (registers the assembled-network file opener for kbricks export)
)
from .method import KnowledgeFactorization, batch_gaussian_kl, gaussian_kl, imb_loss, info_nce, infomax_bound, merge_other

__all__ = ["KnowledgeFactorization", "batch_gaussian_kl", "gaussian_kl", "imb_loss", "info_nce", "infomax_bound", "merge_other"]
