"""Sparse autoencoders behind one interface: build with make_sae(cfg), train with forward/before/after_optimizer_step,
persist with save_sae / load_sae, publish with export_saelens / load_saelens (cfg.json metadata: saelens_metadata)."""
from pipeline.config.sae import ResampleConfig, SAEConfig

from .base import SAEOutput, SparseAutoencoder
from .export import export_saelens, load_saelens, saelens_metadata
from .factory import ARCHITECTURES, make_sae
from .init import decoder_bias_init, geometric_median, input_scale_factor
from .persist import load_sae, save_sae
from .relu import ReluSAE2023, ReluSAE2024
from .resample import resample_dead_latents
from .topk import BatchTopKSAE, TopKSAE, batch_threshold, sparse_decode

__all__ = [
    "ARCHITECTURES", "BatchTopKSAE", "ReluSAE2023", "ReluSAE2024", "ResampleConfig", "SAEConfig", "SAEOutput",
    "SparseAutoencoder", "TopKSAE", "batch_threshold", "decoder_bias_init", "export_saelens", "geometric_median",
    "input_scale_factor", "load_sae", "load_saelens", "make_sae", "resample_dead_latents", "saelens_metadata",
    "save_sae", "sparse_decode",
]
