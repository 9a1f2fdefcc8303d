"""The non-GGUF loading path (a local HF directory), the `mlp_out` hook, bf16 compute, and truncation exactness."""
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.config import ExtractRunConfig, ModelConfig, validate
from pipeline.extract.hooks import LayerCapture
from pipeline.extract.model import load_model
from pipeline.extract.runner import run_extract
from pipeline.store import ActivationDataset

from conftest import SAMPLE


@pytest.fixture(scope="module")
def local_llama(tmp_path_factory, smollm2):
    """A small randomly initialised Llama saved as an ordinary HF directory, with SmolLM2's tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smollm2.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(path)
    smollm2.tokenizer.save_pretrained(path)
    return path


def reference(model, ids, layer, hook):
    """The hooked activation from the full, untruncated model."""
    grabbed = {}
    target = model.model.layers[layer] if hook == "resid_post" else model.model.layers[layer].mlp
    handle = target.register_forward_hook(lambda m, i, o: grabbed.setdefault("x", o[0] if isinstance(o, tuple) else o))
    with torch.inference_mode():
        out = model(ids, output_hidden_states=True)
    handle.remove()
    return grabbed["x"], out.hidden_states


@pytest.mark.parametrize("hook", ["resid_post", "mlp_out"])
def test_truncated_capture_equals_full_model(local_llama, hook):
    loaded = load_model(ModelConfig(name=str(local_llama)))
    ids = torch.randint(3, 1000, (2, 20), generator=torch.Generator().manual_seed(1))
    full, hidden = reference(loaded.model, ids, 2, hook)
    with LayerCapture(loaded.model, 2, hook) as capture:
        assert len(capture.decoder.layers) == 3
        got = capture(ids)
    assert len(loaded.model.model.layers) == 4, "close() gives the whole model back"
    assert torch.equal(got, full)
    if hook == "resid_post":
        assert torch.equal(got, hidden[3])


def test_local_directory_mlp_out_bf16_extraction(tmp_path, local_llama):
    root = tmp_path / "ds"
    cfg = validate(ExtractRunConfig, {
        "corpus": {"paths": [SAMPLE], "token_budget": 1500},
        "model": {"name": str(local_llama), "dtype": "bfloat16"},
        "extract": {"layer": 1, "hook": "mlp_out", "ctx_len": 32, "batch_size": 4, "exclude_first": 2},
        "store": {"root": str(root), "contexts_per_shard": 16},
    })
    manifest = run_extract(cfg, show_progress=False)
    ds = ActivationDataset.open(root, expected_d_model=64)
    assert ds.meta.hook == "mlp_out" and ds.meta.compute_dtype == "bfloat16" and ds.meta.model == str(local_llama)
    meta = ds.read_metadata(0).to_pydict()
    assert min(meta["pos"]) == 3, "BOS and the first 2 positions after it are not stored"
    assert manifest["rows"] == ds.num_rows > 0
    ctx = ds.read_contexts(0).to_pylist()[0]
    loaded = load_model(ModelConfig(name=str(local_llama), dtype="bfloat16"))
    expected, _ = reference(loaded.model, torch.tensor([ctx["token_ids"]]), 1, "mlp_out")
    rows = np.nonzero(np.asarray(meta["context_id"]) == ctx["context_id"])[0]
    stored = ds.read_acts(0)[rows]
    pos = np.asarray(meta["pos"])[rows]
    assert torch.allclose(stored.float(), expected[0, pos].float(), rtol=2 ** -7, atol=1e-3)


def test_unknown_layer_is_a_clear_error(tmp_path, local_llama):
    cfg = validate(ExtractRunConfig, {
        "corpus": {"paths": [SAMPLE], "token_budget": 100},
        "model": {"name": str(local_llama)},
        "extract": {"layer": 9},
        "store": {"root": str(tmp_path / "ds")},
    })
    with pytest.raises(ValueError, match="layer 9: the model has layers 0..3"):
        run_extract(cfg, show_progress=False)
