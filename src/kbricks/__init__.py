"""kbricks: modular knowledge transfer between neural networks (KF, SupSup/ImpressLearn, SSKT and baselines)."""

__version__ = "0.1.0"
