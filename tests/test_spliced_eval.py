"""Spliced evaluation on the real SmolLM2 with the small trained SAE of the `smollm2_sae` fixture: the scores are
reported and mean something (the trained SAE beats the same SAE with its decoder rows shuffled; an identity "SAE"
costs nothing), the averaged tokens are exactly the ones the module says, and `saepipe eval` runs and refuses bad
input before it loads the model."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from pipeline.analysis import spliced_eval as se
from pipeline.analysis.source import open_sae_source
from pipeline.cli.main import main

pytestmark = pytest.mark.slow

CONTEXTS = 6  # each is up to 128 tokens; every forward pass of the 135M model on two cores counts


@pytest.fixture(scope="module")
def evaluated(smollm2_sae, smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("spliced") / "spliced.json"
    result = se.run_spliced_eval(smollm2_sae.run_dir, contexts=CONTEXTS, model=smollm2, out=out, show_progress=False)
    return result, out


@pytest.fixture(scope="module")
def controls(smollm2_sae, smollm2):
    """The shuffled-decoder SAE and the identity on the same contexts, sharing one clean and one zero pass."""
    source = open_sae_source(smollm2_sae.run_dir)
    shuffled = copy.deepcopy(source.sae)
    with torch.no_grad():
        perm = torch.randperm(shuffled.cfg.d_sae, generator=torch.Generator().manual_seed(0))
        shuffled.W_dec.copy_(shuffled.W_dec[perm])
    contexts, _ = se.held_out_contexts(source.dataset, source.held_out_shards, CONTEXTS)
    meta = source.dataset.meta
    return se.spliced_metrics(
        smollm2, contexts, layer=meta.layer, hook=meta.hook,
        reconstructions={"shuffled": se.sae_reconstruct(shuffled), "identity": se.identity_reconstruct},
        first_scored=1 + meta.exclude_first, special_ids=se.special_token_ids(smollm2, source.dataset),
        show_progress=False)


def test_scores_reported_and_written(evaluated, smollm2_sae):
    result, out = evaluated
    on_disk = json.loads(out.read_text())
    assert on_disk == {k: v for k, v in result.items() if k != "out"}
    assert on_disk["format"] == se.FORMAT and on_disk["contexts"] == CONTEXTS
    assert on_disk["layer"] == 15 and on_disk["hook"] == "resid_post"
    assert result["ce_clean"] < result["ce_sae"] < result["ce_zero"]
    assert 0 < result["kl_sae"] < result["kl_zero"]
    # The fixture's 150-step SAE: about 0.94 for both, FVU about 0.32 (measured).
    assert 0.8 < result["ce_loss_score"] < 1 and 0.8 < result["kl_div_score"] < 1
    assert 0 < result["fvu"] < 0.6
    assert 0 < result["l0"] <= smollm2_sae.train.sae.k


def test_trained_sae_beats_shuffled_decoder(evaluated, controls):
    result, _ = evaluated
    shuffled = controls["shuffled"]
    assert shuffled["tokens"] == result["tokens"] and shuffled["ce_clean"] == pytest.approx(result["ce_clean"], rel=1e-9)
    assert result["ce_loss_score"] > shuffled["ce_loss_score"] + 0.2
    assert result["kl_div_score"] > shuffled["kl_div_score"] + 0.2
    assert shuffled["fvu"] > result["fvu"]


def test_identity_sae_costs_nothing(evaluated, controls):
    ident = controls["identity"]
    assert ident["ce_sae"] == pytest.approx(ident["ce_clean"], abs=1e-9)
    assert ident["kl_sae"] == pytest.approx(0.0, abs=1e-9)
    assert ident["ce_loss_score"] == pytest.approx(1.0, abs=1e-9) and ident["fvu"] == 0.0
    assert ident["ce_clean"] == pytest.approx(evaluated[0]["ce_clean"], rel=1e-9)


def test_averaged_tokens_exclude_bos_sink_and_last(evaluated, smollm2_sae, smollm2):
    """Counted independently from the stored contexts: position t counts when t >= 1 + exclude_first, t has a
    target, and neither token is special."""
    result, _ = evaluated
    source = open_sae_source(smollm2_sae.run_dir)
    contexts, _ = se.held_out_contexts(source.dataset, source.held_out_shards, CONTEXTS)
    special = set(se.special_token_ids(smollm2, source.dataset))
    first = 1 + source.dataset.meta.exclude_first
    assert first == 2 and source.dataset.meta.bos_token_id in special
    expected = sum(1 for c in contexts for t in range(first, len(c) - 1)
                   if int(c[t]) not in special and int(c[t + 1]) not in special)
    assert result["tokens"] == expected
    assert expected < sum(len(c) for c in contexts) - 2 * len(contexts)
    assert result["excluded"]["first_positions"] == 2


def test_special_tokens_inside_a_context_are_not_scored():
    bos, eos = 1, 2
    ids = torch.tensor([[bos, 10, 11, 12, eos, 13, 14], [bos, 20, 21, 22, 0, 0, 0]])
    lengths = torch.tensor([7, 4])
    spliced = se.splice_mask(ids, lengths, 2, [bos, eos])
    scored = se.score_mask(ids, lengths, 2, [bos, eos])
    assert spliced.tolist() == [[False, False, True, True, False, True, True],
                                [False, False, True, True, False, False, False]]
    # Row 0: 3 predicts EOS and 4 is EOS; 6 is last. Row 1: 3 is its last real token.
    assert scored.tolist() == [[False, False, True, False, False, True, False],
                               [False, False, True, False, False, False, False]]


def test_store_model_config(smollm2_sae):
    source = open_sae_source(smollm2_sae.run_dir)
    cfg = se.store_model_config(source.dataset, "cpu")
    assert (cfg.name, cfg.dtype, cfg.device) == ("smollm2", "float32", "cpu")


def test_cli_eval_json(smollm2_sae, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert main(["eval", str(smollm2_sae.run_dir), "--contexts", "2", "--device", "cpu", "--out", str(out),
                 "--json", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["out"] == str(out) and json.loads(out.read_text())["tokens"] == printed["tokens"] > 0
    assert 0 < printed["ce_loss_score"] < 1


@pytest.mark.parametrize("args, message", [
    (["--contexts", "0"], "contexts: 0"),
    (["--batch-size", "0"], "batch_size: 0"),
    (["--store", "/nonexistent/store"], "does not exist"),
])
def test_cli_eval_bad_input(smollm2_sae, monkeypatch, capsys, args, message):
    monkeypatch.setattr(se, "load_model", _no_model_load)
    assert main(["eval", str(smollm2_sae.run_dir), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("saepipe eval: error:") and message in err


def test_cli_eval_bare_sae_dir_needs_out(smollm2_sae, monkeypatch, capsys):
    monkeypatch.setattr(se, "load_model", _no_model_load)
    assert main(["eval", str(smollm2_sae.sae_dir)]) == 2
    assert "--out" in capsys.readouterr().err


def test_cli_eval_missing_run(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err


def _no_model_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the input was checked")


def test_held_out_contexts_come_from_held_out_shards(smollm2_sae):
    source = open_sae_source(smollm2_sae.run_dir)
    contexts, shards = se.held_out_contexts(source.dataset, source.held_out_shards, 3)
    assert shards == source.held_out_shards[:1]
    stored = source.dataset.read_contexts(shards[0]).column("token_ids").to_pylist()[:3]
    assert [c.tolist() for c in contexts] == stored
    assert all(c[0] == source.dataset.meta.bos_token_id for c in contexts)
    assert all(isinstance(c, np.ndarray) for c in contexts)
