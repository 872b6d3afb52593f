"""The paper-reproduction harness, outside the library core: multi-seed studies built from the shipped configs
(KF, continual learning, SSKT), the claims with their verdict rules, and the result tables.

Configs are found through ``importlib.resources`` (the copy installed with the package) or an explicit path, so
the harness works from an installed package as well as from a source checkout.
"""

from .cl import run_cl_study
from .claims import CLAIMS, evaluate_claims, readme_summary, reproduce, write_reproduction
from .common import configs_root
from .kf import run_kf_study
from .sskt import run_sskt_study
from .tables import write_results

__all__ = ["CLAIMS", "configs_root", "evaluate_claims", "readme_summary", "reproduce", "run_cl_study", "run_kf_study",
           "run_sskt_study", "write_reproduction", "write_results"]
