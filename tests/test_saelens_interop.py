"""Interop with SAELens itself (sae-lens 6.54, pinned in the test extras), on activations from a real saepipe store:
SAELens loads every recipe's export and encodes/decodes like saepipe, attaches it to the model from the cfg.json
metadata alone, and trains its own SAETrainer on the store through `data_provider`."""
from __future__ import annotations

import os

import pytest
import torch

from pipeline.sae import SAEConfig, export_saelens, load_saelens, make_sae, saelens_metadata
from pipeline.store import ActivationDataset
from helpers.synthetic import write_synthetic_dataset

# Locally a missing sae-lens is a skip; in CI it must be installed, or these tests would vanish unnoticed.
if os.environ.get("CI", "").lower() in ("true", "1"):
    import sae_lens
else:
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install -e '.[test]')")

D, D_SAE, K = 32, 128, 4
EXPECTED_ARCHITECTURE = {"relu_2023": "standard", "relu_2024": "standard", "topk": "topk", "batchtopk": "jumprelu"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = write_synthetic_dataset(tmp_path_factory.mktemp("store"), d=D, shards=2, rows_per_shard=512, ctx_len=65,
                                   row_group_rows=128)
    dataset = ActivationDataset.open(root)
    yield dataset
    dataset.close()


def _max_rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def _trained_on(store: ActivationDataset, arch: str):
    x = store.read_acts(0, dtype=torch.float32)
    sae = make_sae(SAEConfig(arch=arch, d_in=D, d_sae=D_SAE, k=K))
    sae.init_from_sample(x)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for step, batch in enumerate(x.split(128)):
        out = sae(batch, progress=step / 4)
        opt.zero_grad()
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
    sae.eval()
    assert abs(sae.input_scale.item() - 1.0) > 0.1  # so that the folded scale is part of what is checked
    return sae


@pytest.mark.parametrize("arch", sorted(EXPECTED_ARCHITECTURE))
def test_saelens_loads_the_export_and_matches_saepipe(arch, store, tmp_path):
    sae = _trained_on(store, arch)
    export_saelens(sae, tmp_path, metadata=saelens_metadata(store.meta.to_json_dict(), store.root))

    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    ours = load_saelens(tmp_path)
    assert theirs.cfg.architecture() == EXPECTED_ARCHITECTURE[arch]
    x = store.read_acts(1, dtype=torch.float32)[:256]
    with torch.no_grad():
        z_theirs, z_ours = theirs.encode(x), ours.encode(x)
        assert (z_ours > 0).sum(dim=1).float().mean() >= 1  # a real code, not all zeros
        assert _max_rel_diff(z_theirs, z_ours) <= 1e-5
        assert _max_rel_diff(theirs.decode(z_theirs), ours.decode(z_ours)) <= 1e-5
        assert _max_rel_diff(theirs.decode(z_theirs), sae.decode(sae.encode(x))) <= 1e-4

    meta = theirs.cfg.metadata
    assert meta.model_name == "synthetic"  # what write_synthetic_dataset records
    assert (meta.hook_name, meta.hf_hook_name) == ("blocks.0.hook_resid_post", "model.layers.0")
    assert (meta.context_size, meta.prepend_bos, meta.seqpos_slice) == (65, True, [1, None])
    assert meta.activation_store == os.path.abspath(store.root) and meta.saepipe_arch == arch


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random 3-layer Llama saved as an HF model directory (with a tokenizer, which TransformerBridge loads)."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    vocab = {f"t{i}": i for i in range(64)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="t2")),
                                        bos_token="t0", eos_token="t1", unk_token="t2")
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("hook", ["resid_post", "mlp_out"])
def test_saelens_attaches_the_export_to_the_model_its_metadata_names(hook, tiny_llama, tmp_path):
    """cfg.json alone must lead SAELens to the model and to the hook point whose activations saepipe stored."""
    from pipeline.extract.hooks import LayerCapture

    path, model = tiny_llama
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 0
    with LayerCapture(model, 1, hook) as capture:
        stored = capture(ids)  # what extraction writes into a store
    sae = make_sae(SAEConfig(arch="topk", d_in=16, d_sae=64, k=K))
    sae.init_from_sample(stored.reshape(-1, 16))
    sae.eval()
    dataset = {"model": str(path), "layer": 1, "hook": hook, "ctx_len": 12, "bos_token_id": 0, "corpus": {}}
    export_saelens(sae, tmp_path / "sae", metadata=saelens_metadata(dataset, tmp_path / "store"))

    theirs = sae_lens.SAE.load_from_disk(tmp_path / "sae")
    bridge = sae_lens.SAETransformerBridge.boot_transformers(theirs.cfg.metadata.model_name, device="cpu")
    bridge.add_sae(theirs)
    sae_in = bridge.get_sae_hook_name(theirs, "hook_sae_input")
    sae_acts = bridge.get_sae_hook_name(theirs, "hook_sae_acts_post")
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids, names_filter=[sae_in, sae_acts])
        assert _max_rel_diff(cache[sae_in], stored) <= 1e-5
        assert _max_rel_diff(cache[sae_acts], sae.encode(stored)) <= 1e-5


def test_saelens_trainer_trains_on_a_saepipe_store(store, tmp_path):
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata

    batch_size, steps, norm_batches = 128, 40, 4
    batches = store.batches(batch_size, seed=0, dtype=torch.float32, shards=[0])  # shard 1 is held out
    served = []

    def data_provider():
        for batch in batches:
            served.append(batch)
            yield batch

    metadata = SAEMetadata(**saelens_metadata(store.meta.to_json_dict(), store.root))
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=False,
                                                normalize_activations="expected_average_only_in", metadata=metadata))
    w_enc = sae.W_enc.detach().clone()
    held_out = store.read_acts(1, dtype=torch.float32)[:256]

    def mse() -> float:
        with torch.no_grad():
            return (sae(held_out) - held_out).pow(2).sum(-1).mean().item()

    before = mse()
    # lr_end has no default that SAETrainer accepts (its runner fills it in; the bare config leaves it None).
    cfg = SAETrainerConfig(total_training_samples=steps * batch_size, train_batch_size_samples=batch_size, lr=3e-3,
                           lr_end=3e-3, n_batches_for_norm_estimate=norm_batches)
    trainer = SAETrainer(cfg, sae, data_provider())
    try:
        trained = trainer.fit()
    finally:
        batches.close()

    assert trained is sae and trainer.n_training_steps == steps
    assert len(served) == steps + norm_batches and batches.rows_seen == len(served) * batch_size
    assert all(b.shape == (batch_size, D) and b.dtype == torch.float32 for b in served)
    assert not torch.equal(sae.W_enc, w_enc)
    assert mse() < 0.5 * before
    # What SAELens saves from it, saepipe loads (the loop closes on SAELens's own weight file name).
    sae.save_inference_model(tmp_path / "sl")
    ours = load_saelens(tmp_path / "sl")
    with torch.no_grad():
        assert _max_rel_diff(ours.decode(ours.encode(held_out)), sae.decode(sae.encode(held_out))) <= 1e-5
    assert sae_lens.SAE.load_from_disk(tmp_path / "sl").cfg.metadata.hook_name == "blocks.0.hook_resid_post"
