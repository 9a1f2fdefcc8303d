"""SAELens export: layout, folded input normalisation, cfg.json metadata from a store's dataset.json, atomic
replacement, and the project's loader for it. (SAELens itself loads the export in test_saelens_interop.py.)"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import SAEFormatError
from pipeline.sae import SAEConfig, export_saelens, load_saelens, make_sae, saelens_metadata

ARCHS = ["relu_2023", "relu_2024", "topk", "batchtopk"]
D_IN, D_SAE, K = 12, 96, 6
EXPECTED_ARCHITECTURE = {"relu_2023": "standard", "relu_2024": "standard", "topk": "topk", "batchtopk": "jumprelu"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _raw_activations(n: int, seed: int = 0) -> torch.Tensor:
    # Large and off-centre, like residual-stream activations, so that the input scale and b_dec both matter.
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=gen) * 250.0 + 400.0 * torch.linspace(-1, 1, D_IN)


def _trained(arch: str):
    sae = make_sae(SAEConfig(arch=arch, d_in=D_IN, d_sae=D_SAE, k=K))
    x = _raw_activations(256)
    sae.init_from_sample(x)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for step in range(5):
        out = sae(x, progress=step / 5)
        opt.zero_grad()
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
    sae.eval()
    assert abs(sae.input_scale.item() - 1.0) > 0.5
    return sae


def _saelens_forward(cfg: dict, t: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """SAELens's inference math, written from its docs, independent of the project's classes."""
    sae_in = x - t["b_dec"] if cfg["apply_b_dec_to_input"] else x
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    if cfg["architecture"] == "standard":
        acts = pre.relu()
    elif cfg["architecture"] == "topk":
        vals, idx = pre.topk(cfg["k"], dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    else:
        acts = pre * (pre > t["threshold"])
    return acts @ t["W_dec"] + t["b_dec"]


@pytest.mark.parametrize("arch", ARCHS)
def test_export_layout_and_same_reconstruction_on_raw_inputs(arch, tmp_path):
    sae = _trained(arch)
    export_saelens(sae, tmp_path, metadata={"hook_name": "blocks.15.hook_resid_post", "model_name": "SmolLM2-135M"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    tensors = load_file(str(tmp_path / "sae_weights.safetensors"))

    assert cfg["architecture"] == EXPECTED_ARCHITECTURE[arch]
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["normalize_activations"]) == (D_IN, D_SAE, "float32", "none")
    assert cfg["apply_b_dec_to_input"] == (arch != "relu_2024")
    assert cfg["metadata"]["hook_name"] == "blocks.15.hook_resid_post"
    assert cfg["metadata"]["sae_lens_version"].startswith("6.")
    assert cfg["metadata"]["model_name"] == "SmolLM2-135M" and cfg["metadata"]["saepipe_arch"] == arch
    assert cfg.get("k") == (K if arch == "topk" else None)
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    expected = {"W_enc": (D_IN, D_SAE), "W_dec": (D_SAE, D_IN), "b_enc": (D_SAE,), "b_dec": (D_IN,)}
    if arch == "batchtopk":
        expected["threshold"] = (D_SAE,)
    assert shapes == expected

    x = _raw_activations(64, seed=9)
    with torch.no_grad():
        original = sae.decode(sae.encode(x))
        loaded = load_saelens(tmp_path)
        assert type(loaded) is type(sae) and loaded.input_scale.item() == 1.0
        torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(loaded.decode(loaded.encode(x)), original, rtol=1e-4, atol=1e-2)
        torch.testing.assert_close(_saelens_forward(cfg, tensors, x), original, rtol=1e-4, atol=1e-2)
        # The check is sensitive: the same tensors without the fold give a different reconstruction.
        unfolded = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec,
                    "threshold": tensors.get("threshold")}
        assert not torch.allclose(_saelens_forward(cfg, unfolded, x), original, rtol=1e-2, atol=1.0)


def test_export_in_bfloat16_loads_back_close(tmp_path):
    sae = _trained("topk")
    export_saelens(sae, tmp_path, dtype="bfloat16")
    assert json.loads((tmp_path / "cfg.json").read_text())["dtype"] == "bfloat16"
    assert load_file(str(tmp_path / "sae_weights.safetensors"))["W_enc"].dtype == torch.bfloat16
    x = _raw_activations(16, seed=3)
    with torch.no_grad():
        ref = sae.decode(sae.encode(x))
        got = load_saelens(tmp_path).decode(load_saelens(tmp_path).encode(x))
    assert (got - ref).norm() < 0.05 * ref.norm()
    with pytest.raises(ValueError, match="dtype"):
        export_saelens(sae, tmp_path, dtype="int8")


def test_load_saelens_errors_name_the_file(tmp_path):
    with pytest.raises(SAEFormatError, match="cfg.json: cannot read"):
        load_saelens(tmp_path)
    sae = _trained("relu_2023")
    export_saelens(sae, tmp_path)
    weights = tmp_path / "sae_weights.safetensors"
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(SAEFormatError, match="cfg.json: architecture 'gated'"):
        load_saelens(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "jumprelu"}))
    tensors = load_file(str(weights))
    save_file({**tensors, "threshold": torch.rand(D_SAE)}, str(weights))
    with pytest.raises(SAEFormatError, match="per-latent"):
        load_saelens(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "d_sae": D_SAE * 2}))
    save_file(tensors, str(weights))
    with pytest.raises(SAEFormatError, match=r"/sae_weights.safetensors: W_enc has shape"):
        load_saelens(tmp_path)
    weights.unlink()
    with pytest.raises(SAEFormatError, match=r"sae_weights.safetensors: missing"):
        load_saelens(tmp_path)


def test_loader_reads_the_legacy_weight_file_name(tmp_path):
    """Exports before SAELens-compatible naming (and sparsify) call the weights sae.safetensors."""
    sae = make_sae(SAEConfig(arch="topk", d_in=8, d_sae=32, k=4))
    export_saelens(sae, tmp_path)
    (tmp_path / "sae_weights.safetensors").rename(tmp_path / "sae.safetensors")
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(load_saelens(tmp_path).decode(load_saelens(tmp_path).encode(x)),
                                   sae.decode(sae.encode(x)), rtol=1e-5, atol=1e-5)


def test_export_replaces_an_earlier_export_whole_and_refuses_other_directories(tmp_path, monkeypatch):
    old, new = _trained("topk"), _trained("relu_2024")
    (tmp_path / "final").mkdir()
    export_saelens(old, tmp_path / "final")
    (tmp_path / "final" / "sae_weights.safetensors").rename(tmp_path / "final" / "sae.safetensors")  # a legacy export
    monkeypatch.setattr("pipeline.sae.export.save_file", _fail_half_way)
    with pytest.raises(OSError, match="disk full"):
        export_saelens(new, tmp_path / "final")
    monkeypatch.undo()
    # The failed export left the old one whole, and no temp directory next to it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert load_saelens(tmp_path / "final").cfg.arch == "topk"
    export_saelens(new, tmp_path / "final")
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert load_saelens(tmp_path / "final").cfg.arch == "relu_2024"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "status.json").write_text("{}")
    with pytest.raises(SAEFormatError, match="run: holds status.json"):
        export_saelens(new, tmp_path / "run")
    assert (tmp_path / "run" / "status.json").exists()


def _fail_half_way(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"partial")
    raise OSError("disk full")


DATASET = {
    "schema_version": 1, "model": "HuggingFaceTB/SmolLM2-360M", "revision": None, "layer": 15, "hook": "resid_post",
    "d_model": 960, "ctx_len": 129, "exclude_first": 0, "bos_token_id": 1,
    "corpus": {"paths": ["/data/pile/00.jsonl.zst"], "hf": None, "token_budget": 1000000},
    "token_budget": 1000000,
}


def test_saelens_metadata_from_dataset_json(tmp_path):
    meta = saelens_metadata(DATASET, tmp_path / "store")
    assert meta["model_name"] == "HuggingFaceTB/SmolLM2-360M"
    assert (meta["hook_name"], meta["hf_hook_name"]) == ("blocks.15.hook_resid_post", "model.layers.15")
    assert (meta["context_size"], meta["prepend_bos"], meta["hook_head_index"]) == (129, True, None)
    assert meta["seqpos_slice"] == [1, None] and meta["exclude_first"] == 0
    assert meta["dataset_path"] is None and meta["corpus"]["paths"] == ["/data/pile/00.jsonl.zst"]
    assert meta["activation_store"] == str(tmp_path / "store")
    assert "model_from_pretrained_kwargs" not in meta and "closest_hf_model" not in meta
    json.dumps(meta)  # it goes into cfg.json as it is

    mlp = saelens_metadata({**DATASET, "hook": "mlp_out", "layer": 3, "exclude_first": 4, "revision": "abc123",
                            "corpus": {"hf": {"name": "monology/pile-uncopyrighted", "split": "train"}}}, tmp_path)
    assert (mlp["hook_name"], mlp["hf_hook_name"]) == ("blocks.3.hook_mlp_out", "model.layers.3.mlp")
    assert mlp["seqpos_slice"] == [5, None] and mlp["exclude_first"] == 4
    assert mlp["dataset_path"] == "monology/pile-uncopyrighted"
    assert mlp["model_from_pretrained_kwargs"] == {"revision": "abc123"}
    local_json = {"hf": {"name": "json", "data_files": ["/data/a.jsonl"]}}
    assert saelens_metadata({**DATASET, "corpus": local_json}, tmp_path)["dataset_path"] is None

    gguf = saelens_metadata({**DATASET, "model": "smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"}, tmp_path)
    assert gguf["model_name"] == "smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"  # what the activations came from
    assert gguf["closest_hf_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ValueError, match=r"dataset.json: hook 'attn_out'"):
        saelens_metadata({**DATASET, "hook": "attn_out"}, tmp_path)


def test_export_writes_the_metadata_and_keeps_its_own_keys(tmp_path):
    sae = _trained("batchtopk")
    meta = saelens_metadata(DATASET, tmp_path / "store")
    export_saelens(sae, tmp_path / "sae", metadata={**meta, "saepipe_arch": "topk"})
    written = json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]
    assert {k: written[k] for k in meta} == meta
    assert written["saepipe_arch"] == "batchtopk" and written["sae_lens_version"].startswith("6.")
