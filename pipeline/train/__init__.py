"""SAE training on stored activations: the accelerate (DDP) trainer with exact resume, held-out evaluation,
the SAELens export, and the PCA baseline. Entry points: Trainer / train (pipeline.train.trainer), `saepipe train`."""
from .baselines import PCABaseline, compare_variants, pca_topk_fvu
from .signals import EXIT_PREEMPTED
from .trainer import Trainer, TrainResult, train

__all__ = ["EXIT_PREEMPTED", "PCABaseline", "TrainResult", "Trainer", "compare_variants", "pca_topk_fvu", "train"]
