"""What `saepipe demo` prints from the analysis: a few features with their top contexts, and one steering example."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def _tokenizer(analysis_dir: Path):
    from pipeline.store import ActivationDataset

    meta = json.loads((analysis_dir / "analysis.json").read_text())
    return ActivationDataset.open(meta["store_root"]).tokenizer


def showcase_features(analysis_dir: Path, count: int) -> list[int]:
    """The most selective features among those that fired often enough to fill their top examples and are not
    dense: the ones a reader learns most from first."""
    table = pq.read_table(analysis_dir / "features.parquet",
                          columns=["feature", "count", "density", "selectivity"]).to_pylist()
    top_k = json.loads((analysis_dir / "analysis.json").read_text())["top_k"]
    alive = [r for r in table if r["count"] >= top_k and r["density"] < 0.1]
    return [r["feature"] for r in sorted(alive, key=lambda r: (-r["selectivity"], r["feature"]))[:count]]


def marked_window(tokenizer, token_ids: list[int], window_start: int, pos: int) -> str:
    at = pos - window_start
    before, token, after = (tokenizer.decode(token_ids[:at]), tokenizer.decode(token_ids[at:at + 1]),
                            tokenizer.decode(token_ids[at + 1:]))
    return f"{before}«{token}»{after}".replace("\r", "").replace("\n", "⏎ ")


def print_features(analysis_dir: Path, count: int = 3, contexts: int = 3) -> list[int]:
    analysis_dir = Path(analysis_dir)
    features = showcase_features(analysis_dir, count)
    tok = _tokenizer(analysis_dir)
    stats = {r["feature"]: r for r in pq.read_table(analysis_dir / "features.parquet").to_pylist()
             if r["feature"] in features}
    examples = pq.read_table(analysis_dir / "examples.parquet",
                             filters=[("kind", "=", "top"), ("rank", "<", contexts)])
    examples = examples.filter(pc.is_in(examples["feature"], value_set=pa.array(features, pa.int32())))
    print(f"\n  {count} features, the most selective (mean activation / ln(firing count + 1)), with their top contexts")
    for f in features:
        s = stats[f]
        print(f"  feature {f}: fires on {100 * s['density']:.3f}% of tokens, max {s['max_act']:.2f}, "
              f"top tokens {', '.join(repr(t) for t in s['top_tokens'])}")
        rows = sorted((r for r in examples.to_pylist() if r["feature"] == f), key=lambda r: r["rank"])
        for r in rows:
            text = marked_window(tok, r["token_ids"], r["window_start"], r["pos"])
            print(f"    {r['activation']:6.2f}  doc {r['doc_id']}: {text}")
    return features


def steering_example(analysis_dir: Path, run_dir: str, model, prompt: str = "My favourite thing to do is") -> dict:
    """Boost the alive feature whose decoder direction is most aimed at one output token, by half the residual
    stream's median norm, and show what it does. (On the demo SAE half the norm already makes the completion repeat
    the token; a quarter of it derails the completion without showing the token.) Raw top logit effects would pick directions that boost a few rare,
    large-norm tokens whatever the feature (see unembed.direct_effect_zscores)."""
    import torch

    from .source import open_sae_source
    from .steer import FeatureEdit, steer
    from .unembed import direct_effect_zscores

    analysis_dir = Path(analysis_dir)
    source = open_sae_source(run_dir)
    counts = pq.read_table(analysis_dir / "features.parquet", columns=["count"]).column("count").to_numpy()
    z = direct_effect_zscores(source.sae, model)
    z[torch.as_tensor(counts == 0)] = float("-inf")
    feature = int(z.argmax())
    logits = pq.read_table(analysis_dir / "logits.parquet", columns=["feature", "boost_tokens"])
    token = logits.filter(pc.equal(logits["feature"], feature)).column("boost_tokens")[0].as_py()[0]
    rows = source.dataset.read_acts(source.held_out_shards[0], torch.float32)[:1024]
    value = 0.5 * float(rows.norm(dim=1).median())
    (result,) = steer(source, model, [prompt], edits=[FeatureEdit(feature, "boost", value)], max_new_tokens=16)
    print(f"\n  steering: feature {feature}, whose decoder direction raises {token!r} most, added at {value:.0f} "
          f"(half the median residual norm) x its decoder direction at every position; greedy")
    print(f"    prompt:   {prompt!r}")
    print(f"    baseline: {result['baseline']!r}")
    print(f"    steered:  {result['steered']!r}")
    return result
