"""SAELens export: layout, folded input normalisation, and the project's loader for it."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.sae import SAEConfig, load_saelens, make_sae

ARCHS = ["relu_2023", "relu_2024", "topk", "batchtopk"]
D_IN, D_SAE, K = 12, 96, 6
EXPECTED_ARCHITECTURE = {"relu_2023": "standard", "relu_2024": "standard", "topk": "topk", "batchtopk": "jumprelu"}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    sae.export_saelens(tmp_path, hook_name="blocks.15.hook_resid_post", model_name="SmolLM2-135M")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    tensors = load_file(str(tmp_path / "sae.safetensors"))

    assert cfg["architecture"] == EXPECTED_ARCHITECTURE[arch]
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["normalize_activations"]) == (D_IN, D_SAE, "float32", "none")
    assert cfg["apply_b_dec_to_input"] == (arch != "relu_2024")
    assert cfg["metadata"]["hook_name"] == "blocks.15.hook_resid_post"
    assert cfg["metadata"]["sae_lens_version"].startswith("6.")
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
    sae.export_saelens(tmp_path, dtype="bfloat16")
    assert json.loads((tmp_path / "cfg.json").read_text())["dtype"] == "bfloat16"
    assert load_file(str(tmp_path / "sae.safetensors"))["W_enc"].dtype == torch.bfloat16
    x = _raw_activations(16, seed=3)
    with torch.no_grad():
        ref = sae.decode(sae.encode(x))
        got = load_saelens(tmp_path).decode(load_saelens(tmp_path).encode(x))
    assert (got - ref).norm() < 0.05 * ref.norm()
    with pytest.raises(ValueError, match="dtype"):
        sae.export_saelens(tmp_path, dtype="int8")


def test_load_saelens_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="cfg.json"):
        load_saelens(tmp_path)
    sae = _trained("relu_2023")
    sae.export_saelens(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(ValueError, match="cfg.json: architecture 'gated'"):
        load_saelens(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "jumprelu"}))
    tensors = load_file(str(tmp_path / "sae.safetensors"))
    save_file({**tensors, "threshold": torch.rand(D_SAE)}, str(tmp_path / "sae.safetensors"))
    with pytest.raises(ValueError, match="per-latent"):
        load_saelens(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "d_sae": D_SAE * 2}))
    save_file(tensors, str(tmp_path / "sae.safetensors"))
    with pytest.raises(ValueError, match=r"/sae.safetensors: W_enc has shape"):
        load_saelens(tmp_path)


def test_loader_reads_saelens_native_weight_file_name(tmp_path):
    """Directories written by SAELens itself name the weights sae_weights.safetensors."""
    from pipeline.config.sae import SAEConfig
    from pipeline.sae import load_saelens, make_sae

    sae = make_sae(SAEConfig(arch="topk", d_in=8, d_sae=32, k=4))
    sae.export_saelens(tmp_path)
    (tmp_path / "sae.safetensors").rename(tmp_path / "sae_weights.safetensors")
    x = torch.randn(5, 8)
    assert torch.allclose(load_saelens(tmp_path).decode(load_saelens(tmp_path).encode(x)), sae.decode(sae.encode(x)), atol=1e-5)
