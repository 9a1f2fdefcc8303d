"""Learning-rate schedule as a pure function of the step, so resuming needs nothing but the step counter."""
from __future__ import annotations

import math

from pipeline.config.train import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """LR for optimiser step `step` (0-based): linear warmup, constant, then decay over the last (1 - decay_start)."""
    total = cfg.total_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    decay_from = max(int(cfg.decay_start * total), cfg.warmup_steps)
    if cfg.decay == "none" or step < decay_from or total <= decay_from:
        return cfg.lr
    frac = min(1.0, (step - decay_from) / (total - decay_from))
    if cfg.decay == "linear":
        return cfg.lr - (cfg.lr - floor) * frac
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * frac))
