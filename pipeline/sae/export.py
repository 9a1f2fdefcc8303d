"""Export to the SAELens (v6) on-disk format, the project's own loader for it, and the cfg.json metadata that lets
SAELens attach the SAE to the model it was trained on.

Layout (what `sae_lens.SAE.load_from_disk` reads): `sae_weights.safetensors` with W_enc [d_in, d_sae], b_enc [d_sae],
W_dec [d_sae, d_in], b_dec [d_in] (+ `threshold` [d_sae] for JumpReLU), and `cfg.json` with the v6 keys: architecture
("standard" / "topk" / "jumprelu"), d_in, d_sae, dtype, device, apply_b_dec_to_input, normalize_activations,
reshape_activations, k (topk), metadata {sae_lens_version, model_name, hook_name, context_size, ...}.

The training-time input scale s (x -> s·x) is folded in, so the exported SAE takes raw activations:
    pre  = (s·x - b_dec)·W_enc + b_enc = (x - b_dec/s)·(s·W_enc) + b_enc
    x̂    = (z·W_dec + b_dec)/s          = z·(W_dec/s) + b_dec/s
Latents and thresholds are unchanged. normalize_activations is therefore "none".
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file
from torch import Tensor

from pipeline.config.sae import SAEConfig
from pipeline.errors import SAEFormatError

from .base import SparseAutoencoder
from .factory import make_sae
from .persist import read_json, read_safetensors, replace_sae_dir

SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"  # sae_lens.constants.SAE_WEIGHTS_FILENAME
# What exports before SAELens-compatible naming wrote (sparsify's name); still read, and replaced on re-export.
LEGACY_WEIGHTS_FILE = "sae.safetensors"
SAELENS_CONFIG_FILE = "cfg.json"
# The cfg.json layout written here is SAELens 6's; SAELens reads metadata.sae_lens_version to pick its parser.
SAELENS_FORMAT_VERSION = "6.0.0"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# TransformerLens hook names (what SAELens attaches by, in HookedSAETransformer and SAETransformerBridge) and HF
# module paths (what saepipe hooks, in pipeline.extract.hooks) of the store's hook points, by layer.
_HOOKS = {
    "resid_post": ("blocks.{layer}.hook_resid_post", "model.layers.{layer}"),
    "mlp_out": ("blocks.{layer}.hook_mlp_out", "model.layers.{layer}.mlp"),
}
# GGUF files the extractor loads by name (pipeline.extract.model), with the hub checkpoint they were quantised from.
_GGUF_ORIGINS = {"smollm2:SmolLM2-135M-Instruct.Q4_1.gguf": "HuggingFaceTB/SmolLM2-135M-Instruct"}


@torch.no_grad()
def export_saelens(sae: SparseAutoencoder, directory: str | Path, *, metadata: Mapping[str, object] | None = None,
                   dtype: str = "float32") -> Path:
    """Write `sae` in SAELens format, replacing an earlier export in `directory` atomically; returns the directory.
    `metadata` (from `saelens_metadata`, or hand-made) lands in cfg.json's metadata."""
    if dtype not in _DTYPES:
        raise ValueError(f"export: dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    scale = sae.input_scale.float()
    tensors = {
        "W_enc": sae.W_enc * scale,
        "b_enc": sae.b_enc,
        "W_dec": sae.W_dec / scale,
        "b_dec": sae.b_dec / scale,
        **sae.saelens_tensor_extras(),
    }
    tensors = {name: t.detach().to(_DTYPES[dtype]).contiguous().cpu() for name, t in tensors.items()}
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
            # SAELens's own trainer writes its version here; None is what its loaders write for SAEs trained elsewhere.
            "sae_lens_training_version": None,
            **(metadata or {}),
            # The project's own loader uses these to rebuild the same recipe class.
            "saepipe_arch": sae.arch,
            "saepipe_input_scale_folded": float(scale),
        },
    }

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / SAELENS_WEIGHTS_FILE))
        (tmp / SAELENS_CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")

    return replace_sae_dir(directory, fill, (SAELENS_WEIGHTS_FILE, LEGACY_WEIGHTS_FILE, SAELENS_CONFIG_FILE))


def saelens_metadata(dataset: Mapping, root: str | Path) -> dict:
    """cfg.json metadata for an SAE trained on the store at `root`, from its dataset.json (as a plain dict).

    SAELens reads model_name, hook_name, context_size, prepend_bos, seqpos_slice and dataset_path to rebuild the
    model and the activations; the other keys record what saepipe knows and SAELens has no key for."""
    dataset_json = Path(root) / "dataset.json"
    hook, layer = dataset["hook"], int(dataset["layer"])
    if hook not in _HOOKS:
        raise ValueError(f"{dataset_json}: hook {hook!r} has no SAELens hook name (known: {sorted(_HOOKS)})")
    tl_hook, hf_hook = (name.format(layer=layer) for name in _HOOKS[hook])
    exclude_first = int(dataset.get("exclude_first") or 0)
    corpus = dict(dataset.get("corpus") or {})
    hf = corpus.get("hf") or {}
    revision = dataset.get("revision")
    meta = {
        "model_name": dataset["model"],
        "hook_name": tl_hook,
        "hf_hook_name": hf_hook,  # SAELens's key for the HF module path (its Qwen-Scope and sparsify loaders)
        "hook_head_index": None,
        "context_size": int(dataset["ctx_len"]),
        "prepend_bos": True,  # every stored context starts with BOS (pipeline.extract.packing)
        # Positions never stored, in SAELens's terms: BOS and the `exclude_first` after it.
        "seqpos_slice": [1 + exclude_first, None],
        # SAELens means an HF hub dataset; local files (or datasets' "json" builder) have none, see `corpus`.
        "dataset_path": hf.get("name") if hf and not hf.get("data_files") else None,
        "exclude_first": exclude_first,
        "bos_token_id": dataset.get("bos_token_id"),
        "corpus": corpus,
        "token_budget": dataset.get("token_budget"),
        "activation_store": os.path.abspath(root),
    }
    if revision:
        # SAELens passes these on to the model loader, and warns the user to do so.
        meta["model_from_pretrained_kwargs"] = {"revision": revision}
    if str(dataset["model"]).endswith(".gguf"):
        # No loader takes this name, but it is what the activations came from: a GGUF dequantised to float32, whose
        # weights are the quantised ones. The hub checkpoint it was made from is the closest loadable model.
        meta["model_weights"] = "GGUF, dequantised to float32"
        meta["closest_hf_model"] = _GGUF_ORIGINS.get(dataset["model"])
    return meta


def load_saelens(directory: str | Path, device: str | torch.device | None = None) -> SparseAutoencoder:
    """Load a SAELens-format SAE (standard / topk / jumprelu with one shared threshold) as a project SAE that takes
    raw activations (input_scale 1, normalize_input off). Reads SAELens's weight file name and the legacy one."""
    directory = Path(directory)
    cfg_path = directory / SAELENS_CONFIG_FILE
    raw = read_json(cfg_path)
    if not isinstance(raw, dict):
        raise SAEFormatError(f"{cfg_path}: not a SAELens config (top level is not an object)")
    for key in ("architecture", "d_in", "d_sae"):
        if key not in raw:
            raise SAEFormatError(f"{cfg_path}: missing key {key!r}")
    if raw.get("normalize_activations", "none") not in ("none", None, False):
        norm = raw["normalize_activations"]
        raise SAEFormatError(f"{cfg_path}: normalize_activations={norm!r} is not supported; "
                             "fold it into the weights first")
    arch = _project_arch(raw, cfg_path)
    try:
        sae_cfg = SAEConfig(arch=arch, d_in=raw["d_in"], d_sae=raw["d_sae"], k=raw.get("k", 32), normalize_input=False,
                            b_dec_init="zeros")
    except ValueError as err:  # pydantic's ValidationError
        raise SAEFormatError(f"{cfg_path}: {' '.join(str(err).split())}") from None
    sae = make_sae(sae_cfg)
    weights_path = _weights_path(directory)
    tensors = {name: t.float() for name, t in read_safetensors(weights_path).items()}
    tensors["input_scale"] = torch.ones(())
    if arch == "batchtopk":
        tensors.update(_shared_threshold(tensors.pop("threshold", None), weights_path))
    sae.load_tensors(tensors, str(weights_path))
    sae.eval()
    return sae.to(device) if device is not None else sae


def _weights_path(directory: Path) -> Path:
    for name in (SAELENS_WEIGHTS_FILE, LEGACY_WEIGHTS_FILE):
        if (directory / name).is_file():
            return directory / name
    raise SAEFormatError(f"{directory / SAELENS_WEIGHTS_FILE}: missing (nor is there a {LEGACY_WEIGHTS_FILE})")


def _project_arch(raw: dict, cfg_path: Path) -> str:
    architecture = raw["architecture"]
    apply_b_dec = bool(raw.get("apply_b_dec_to_input", True))
    if architecture == "standard":
        # Only inference matters after export: the two ReLU recipes differ there by whether x - b_dec is encoded.
        return "relu_2023" if apply_b_dec else "relu_2024"
    if architecture == "topk":
        if "k" not in raw:
            raise SAEFormatError(f"{cfg_path}: topk SAE without key 'k'")
        if not apply_b_dec or raw.get("rescale_acts_by_decoder_norm", False):
            raise SAEFormatError(f"{cfg_path}: topk SAEs need apply_b_dec_to_input=true and no decoder-norm "
                                 "rescaling here")
        return "topk"
    if architecture == "jumprelu":
        if not apply_b_dec:
            raise SAEFormatError(f"{cfg_path}: jumprelu without apply_b_dec_to_input is not supported")
        return "batchtopk"
    raise SAEFormatError(f"{cfg_path}: architecture {architecture!r} is not supported (standard, topk, jumprelu)")


def _shared_threshold(threshold: Tensor | None, path: Path) -> dict[str, Tensor]:
    # The project's BatchTopK has one global threshold; Gemma-Scope-style per-latent thresholds are refused.
    if threshold is None or threshold.numel() == 0:
        raise SAEFormatError(f"{path}: jumprelu SAE without a 'threshold' tensor")
    if not torch.all(threshold == threshold.flatten()[0]):
        raise SAEFormatError(f"{path}: per-latent jumprelu thresholds are not supported, only one shared value")
    return {"threshold": threshold.flatten()[0].clone(), "threshold_updates": torch.ones((), dtype=torch.long)}
