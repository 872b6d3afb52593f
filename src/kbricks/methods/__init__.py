"""Training methods, one small file each, registered by name: supervised, kd, dml, maxl, sskt, kf.

(Continual strategies, SupSup and ImpressLearn, live in ``kbricks.continual`` and register in the same registry
with the tag ``continual``.)
"""

from . import dml, kd, kf, maxl, sskt, supervised  # noqa: F401  (registers methods)
from ._teacher import TEACHER_HELP, check_teacher_outputs, example_inputs, input_norm, load_network, load_teacher
from .base import METHODS, Batch, Method, MethodContext, MethodParams, list_methods

__all__ = ["METHODS", "TEACHER_HELP", "Batch", "Method", "MethodContext", "MethodParams", "check_teacher_outputs", "example_inputs",
           "input_norm", "list_methods", "load_network", "load_teacher"]
