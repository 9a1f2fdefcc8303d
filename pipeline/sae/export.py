"""Export to the SAELens (v6) on-disk format, and the project's own loader for it.

Layout: `sae.safetensors` with W_enc [d_in, d_sae],
b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in] (+ `threshold` [d_sae] for JumpReLU), and `cfg.json` with the v6
keys: architecture ("standard" / "topk" / "jumprelu"), d_in, d_sae, dtype, device, apply_b_dec_to_input,
normalize_activations, reshape_activations, k (topk), metadata {sae_lens_version, hook_name, model_name, ...}.

The training-time input scale s (x -> s·x) is folded in, so the exported SAE takes raw activations:
    pre  = (s·x - b_dec)·W_enc + b_enc = (x - b_dec/s)·(s·W_enc) + b_enc
    x̂    = (z·W_dec + b_dec)/s          = z·(W_dec/s) + b_dec/s
Latents and thresholds are unchanged. normalize_activations is therefore "none".
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from pipeline.config.sae import SAEConfig

from .base import SparseAutoencoder, _read_safetensors
from .factory import make_sae

SAELENS_WEIGHTS_FILE = "sae.safetensors"
# The name SAELens's own `save_model` writes; the loader also reads directories written by SAELens itself.
SAELENS_NATIVE_WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_CONFIG_FILE = "cfg.json"
# The cfg.json layout written here is SAELens 6's; SAELens reads metadata.sae_lens_version to pick its parser.
SAELENS_FORMAT_VERSION = "6.0.0"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@torch.no_grad()
def export_saelens(
    sae: SparseAutoencoder, directory: str | Path, *, dtype: str = "float32", **metadata: object
) -> None:
    """Write `sae` in SAELens format. `metadata` (hook_name, model_name, context_size, ...) lands in cfg.json."""
    if dtype not in _DTYPES:
        raise ValueError(f"export: dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    scale = sae.input_scale.float()
    tensors = {
        "W_enc": sae.W_enc * scale,
        "b_enc": sae.b_enc,
        "W_dec": sae.W_dec / scale,
        "b_dec": sae.b_dec / scale,
        **sae.saelens_tensor_extras(),
    }
    tensors = {name: t.detach().to(_DTYPES[dtype]).contiguous().cpu() for name, t in tensors.items()}
    save_file(tensors, str(directory / SAELENS_WEIGHTS_FILE))
    cfg = {
        "architecture": sae.saelens_architecture,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **sae.saelens_config_extras(),
        "activation_fn": "relu",  # read by SAELens < 6; 6 ignores it
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": "saepipe",
            **metadata,
            # The project's own loader uses these to rebuild the same recipe class.
            "saepipe_arch": sae.arch,
            "saepipe_input_scale_folded": float(scale),
        },
    }
    (directory / SAELENS_CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")


def load_saelens(directory: str | Path, device: str | torch.device | None = None) -> SparseAutoencoder:
    """Load a SAELens-format SAE (standard / topk / jumprelu with one shared threshold) as a project SAE that takes
    raw activations (input_scale 1, normalize_input off)."""
    directory = Path(directory)
    cfg_path = directory / SAELENS_CONFIG_FILE
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{cfg_path}: cannot read SAELens config: {str(err).splitlines()[0]}") from None
    for key in ("architecture", "d_in", "d_sae"):
        if key not in raw:
            raise ValueError(f"{cfg_path}: missing key {key!r}")
    if raw.get("normalize_activations", "none") not in ("none", None, False):
        norm = raw["normalize_activations"]
        raise ValueError(f"{cfg_path}: normalize_activations={norm!r} is not supported; fold it into the weights first")
    arch = _project_arch(raw, cfg_path)
    sae_cfg = SAEConfig(
        arch=arch, d_in=raw["d_in"], d_sae=raw["d_sae"], k=raw.get("k", 32), normalize_input=False, b_dec_init="zeros"
    )
    sae = make_sae(sae_cfg)
    weights_path = directory / SAELENS_WEIGHTS_FILE
    if not weights_path.exists() and (directory / SAELENS_NATIVE_WEIGHTS_FILE).exists():
        weights_path = directory / SAELENS_NATIVE_WEIGHTS_FILE
    tensors = {name: t.float() for name, t in _read_safetensors(weights_path).items()}
    tensors["input_scale"] = torch.ones(())
    if arch == "batchtopk":
        tensors.update(_shared_threshold(tensors.pop("threshold", None), weights_path))
    sae.load_tensors(tensors, str(weights_path))
    sae.eval()
    return sae.to(device) if device is not None else sae


def _project_arch(raw: dict, cfg_path: Path) -> str:
    architecture = raw["architecture"]
    apply_b_dec = bool(raw.get("apply_b_dec_to_input", True))
    if architecture == "standard":
        # Only inference matters after export: the two ReLU recipes differ there by whether x - b_dec is encoded.
        return "relu_2023" if apply_b_dec else "relu_2024"
    if architecture == "topk":
        if "k" not in raw:
            raise ValueError(f"{cfg_path}: topk SAE without key 'k'")
        if not apply_b_dec or raw.get("rescale_acts_by_decoder_norm", False):
            raise ValueError(f"{cfg_path}: topk SAEs need apply_b_dec_to_input=true and no decoder-norm rescaling here")
        return "topk"
    if architecture == "jumprelu":
        if not apply_b_dec:
            raise ValueError(f"{cfg_path}: jumprelu without apply_b_dec_to_input is not supported")
        return "batchtopk"
    raise ValueError(f"{cfg_path}: architecture {architecture!r} is not supported (standard, topk, jumprelu)")


def _shared_threshold(threshold: Tensor | None, path: Path) -> dict[str, Tensor]:
    # The project's BatchTopK has one global threshold; Gemma-Scope-style per-latent thresholds are refused.
    if threshold is None or threshold.numel() == 0:
        raise ValueError(f"{path}: jumprelu SAE without a 'threshold' tensor")
    if not torch.all(threshold == threshold.flatten()[0]):
        raise ValueError(f"{path}: per-latent jumprelu thresholds are not supported, only one shared value")
    return {"threshold": threshold.flatten()[0].clone(), "threshold_updates": torch.ones((), dtype=torch.long)}
