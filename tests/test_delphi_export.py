"""`saepipe export delphi`: the export read back by EleutherAI delphi's own loader (eai-delphi, installed with
--no-deps by the Makefile, imports without vLLM), equal to a brute-force encode of the exported rows, in delphi's
documented layout. Under CI a missing delphi is a failure, not a skip."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from pipeline.analysis.delphi_export import export_delphi, split_bounds
from pipeline.errors import ConfigError
from pipeline.sae import load_saelens
from pipeline.store import ActivationDataset


def _delphi():
    try:
        from delphi.config import ConstructorConfig, SamplerConfig
        from delphi.latents.loader import LatentDataset, TensorBuffer
    except ImportError as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"delphi's loader does not import under CI: {err}")
        pytest.skip(f"eai-delphi not installed (pip install --no-deps eai-delphi==0.1.3): {err}")
    return ConstructorConfig, SamplerConfig, LatentDataset, TensorBuffer


@pytest.fixture(scope="module")
def exported(smollm2_sae, tmp_path_factory):
    out = tmp_path_factory.mktemp("delphi") / "cache"
    module = export_delphi(smollm2_sae.run_dir, out, tokens=1500, n_splits=3, show_progress=False)
    return module


def _brute_force(smollm2_sae, module):
    """Every (context row, position, latent) -> activation of the exported rows, encoded here directly."""
    cfg = json.loads((module / "config.json").read_text())
    ds = ActivationDataset.open(smollm2_sae.store_root)
    sae = load_saelens(smollm2_sae.sae_dir).eval()
    shard = [int(s) for s in cfg["dataset_split"].split("[")[1].rstrip("]").split(",")][0]
    rows = cfg["saepipe"]["stored_rows"]
    md = ds.read_metadata(shard, ["context_id", "pos"]).slice(0, rows)
    context_id, pos = md.column("context_id").to_numpy(), md.column("pos").to_numpy()
    with torch.no_grad():
        r, f, v = sae.encode_sparse(ds.read_acts(shard, torch.float32)[:rows])
    ctx_row = np.searchsorted(np.unique(context_id), context_id)
    keys = np.stack([ctx_row[r.numpy()], pos[r.numpy()], f.numpy()], 1)
    return keys, v.numpy(), ds, shard, np.unique(context_id)


def test_delphis_loader_reads_back_what_a_direct_encode_gives(smollm2_sae, exported):
    ConstructorConfig, SamplerConfig, LatentDataset, TensorBuffer = _delphi()
    keys, values, ds, shard, contexts = _brute_force(smollm2_sae, exported)
    got_keys, got_values = [], []
    for path in sorted(exported.glob("*.safetensors"), key=lambda p: int(p.stem.split("_")[0])):
        locations, activations, tokens = TensorBuffer(str(path), exported.name).load()  # delphi's own reader
        got_keys.append(locations.numpy())
        got_values.append(activations.float().numpy())
        assert tokens is not None and tokens.shape == (len(contexts), 128)
    got_keys, got_values = np.concatenate(got_keys), np.concatenate(got_values)
    order, got_order = np.lexsort(keys.T[::-1]), np.lexsort(got_keys.T[::-1])
    assert np.array_equal(got_keys[got_order], keys[order])
    np.testing.assert_allclose(got_values[got_order], values[order].astype(np.float16).astype(np.float32))
    # the tokens are the stored contexts, BOS first, and a location's token is the row's stored token
    ctx = ds.read_contexts(shard).to_pylist()
    by_id = {c["context_id"]: c["token_ids"] for c in ctx}
    for i, cid in enumerate(contexts[:5]):
        seq = by_id[int(cid)]
        assert tokens[i, : len(seq)].tolist() == seq
    md = ds.read_metadata(shard, ["token_id"]).column("token_id").to_numpy()
    first = keys[0]
    assert tokens[first[0], first[1]].item() == md[0]  # row 0 of the shard is context 0's first stored position


def test_delphis_latent_dataset_builds_records_from_the_export(smollm2_sae, exported):
    ConstructorConfig, SamplerConfig, LatentDataset, TensorBuffer = _delphi()
    keys, values, ds, _, _ = _brute_force(smollm2_sae, exported)
    counts = np.bincount(keys[:, 2])
    wanted = np.flatnonzero(counts >= 30)[:3]
    assert len(wanted) == 3
    dataset = LatentDataset(exported.parent, SamplerConfig(n_examples_train=5, n_examples_test=5, n_quantiles=5),
                            ConstructorConfig(min_examples=10, n_non_activating=5, example_ctx_len=32),
                            tokenizer=ds.tokenizer, modules=[exported.name],
                            latents={exported.name: torch.tensor(wanted)})
    records = list(dataset)
    assert sorted(int(r.latent.latent_index) for r in records) == wanted.tolist()
    for r in records:
        f = int(r.latent.latent_index)
        assert len(r.train) == 5 and len(r.not_active) == 5
        assert r.max_activation == pytest.approx(float(values[keys[:, 2] == f].max()), rel=2e-3)


def test_layout_follows_delphis_schema(exported, smollm2_sae):
    from safetensors.numpy import load_file

    d_sae = load_saelens(smollm2_sae.sae_dir).cfg.d_sae
    assert exported.name == "layers.15"
    names = sorted(p.name for p in exported.glob("*.safetensors"))
    assert names == sorted(f"{a}_{b}.safetensors" for a, b in split_bounds(d_sae, 3))
    cfg = json.loads((exported / "config.json").read_text())
    for key in ("dataset_repo", "dataset_split", "dataset_name", "dataset_column", "batch_size", "cache_ctx_len",
                "n_tokens", "n_splits", "model_name"):
        assert key in cfg, key
    assert cfg["cache_ctx_len"] == 128 and cfg["n_splits"] == 3
    for name in names:
        data = load_file(str(exported / name))
        start, end = (int(x) for x in name.removesuffix(".safetensors").split("_"))
        assert set(data) == {"locations", "activations", "tokens"}
        assert data["locations"].dtype == np.uint16 and data["locations"].shape[1] == 3
        assert data["activations"].dtype == np.float16 and len(data["activations"]) == len(data["locations"])
        assert data["locations"][:, 2].max() <= end - start
        assert (data["activations"] > 0).all()


def test_bad_arguments_fail_before_any_work(smollm2_sae, tmp_path):
    with pytest.raises(ConfigError, match="--splits"):
        export_delphi(smollm2_sae.run_dir, tmp_path / "x", n_splits=0)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a delphi cache"):
        export_delphi(smollm2_sae.run_dir, tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"
