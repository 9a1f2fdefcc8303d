"""SAE training on stored activations: the accelerate (DDP) trainer with exact resume, assembled from its data
provider, held-out evaluator, checkpointer and metrics; `saepipe train`."""
from .callbacks import TrainCallback
from .trainer import Trainer, TrainResult, train
from .variants import compare_variants

__all__ = ["TrainCallback", "TrainResult", "Trainer", "compare_variants", "train"]
