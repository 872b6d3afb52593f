"""Knowledge Factorization: the method (IMB objective), the brick store, the evaluation report, representation
analysis."""

from .method import KnowledgeFactorization, gaussian_kl, imb_loss, info_nce, merge_other

__all__ = ["KnowledgeFactorization", "gaussian_kl", "imb_loss", "info_nce", "merge_other"]
