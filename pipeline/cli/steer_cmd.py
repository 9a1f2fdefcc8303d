"""`saepipe steer RUN --prompt TEXT [--prompt ...] --feature ID [--feature ...] --mode boost|clamp|ablate [--value C]`:
generate with SAE features turned as knobs, next to the unedited model's completion.

  boost   add C·W_dec[i] to the hooked layer's output at every position
  clamp   set feature i's activation to C: x' = x + (C - z_i)·W_dec[i], keeping the SAE's reconstruction error
  ablate  the same with C = 0 (no --value)
Every --feature gets the same mode and value. Greedy by default; --sample draws with --seed and --temperature, the
same draws for the baseline and the steered run. RUN is a training run dir or a SAELens-format SAE dir (with --store
unless its cfg.json names an existing activation store); the model is the one the store records."""
from __future__ import annotations

import argparse
import json

from pipeline.errors import ConfigError


def add_parser(subparsers, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser("steer", parents=[common], description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              help="generate with SAE features boosted, clamped or ablated, next to the baseline")
    p.add_argument("run", help="training run dir, or a SAELens-format SAE dir")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    p.add_argument("--feature", action="append", type=int, required=True, help="feature id (repeatable)")
    p.add_argument("--mode", choices=["boost", "clamp", "ablate"], required=True)
    p.add_argument("--value", type=float, help="boost: the coefficient C; clamp: the activation to hold")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--seed", type=int, help="sampling seed (default 0; needs --sample)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default 1.0; needs --sample)")
    p.add_argument("--store", help="activation store root (default: the run's data.root)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default auto)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars while the model loads")
    p.set_defaults(func=run)


def edits_from_args(args: argparse.Namespace) -> list:
    from pipeline.analysis.steer import FeatureEdit

    if args.mode == "ablate":
        if args.value is not None:
            raise ConfigError("--value: ablate sets the feature to 0 and takes no value")
        value = 0.0
    elif args.value is None:
        raise ConfigError(f"--value: --mode {args.mode} needs a value")
    else:
        value = args.value
    if not args.sample and (args.seed is not None or args.temperature is not None):
        raise ConfigError("--seed and --temperature only apply with --sample (decoding is greedy otherwise)")
    return [FeatureEdit(f, args.mode, value) for f in args.feature]


def run(args: argparse.Namespace) -> int:
    from pipeline.analysis.source import open_sae_source
    from pipeline.analysis.spliced_eval import check_model_matches_store, store_model_config
    from pipeline.analysis.steer import check_edits, check_generation, steer
    from pipeline.extract.model import load_model

    edits = edits_from_args(args)
    seed = args.seed if args.seed is not None else 0
    temperature = args.temperature if args.temperature is not None else 1.0
    check_generation(args.prompt, args.max_new_tokens, temperature)
    source = open_sae_source(args.run, args.store)
    check_edits(edits, source.sae.cfg.d_sae)
    # Everything above is cheap; only now the model.
    model = load_model(store_model_config(source.dataset, args.device), show_progress=not args.no_progress)
    check_model_matches_store(model, source.dataset)
    results = steer(source, model, args.prompt, edits=edits, max_new_tokens=args.max_new_tokens,
                    greedy=not args.sample, seed=seed, temperature=temperature)
    if args.json:
        print(json.dumps({"sae_dir": str(source.sae_dir), "edits": [e.to_dict() for e in edits],
                          "greedy": not args.sample, "seed": seed if args.sample else None,
                          "temperature": temperature if args.sample else None, "results": results}))
        return 0
    what = ", ".join(f"feature {e.feature} {e.mode}" + ("" if e.mode == "ablate" else f" {e.value:g}") for e in edits)
    decoding = f"sampled, seed {seed}, temperature {temperature:g}" if args.sample else "greedy"
    print(f"steering {source.sae_dir}: {what}; {decoding}")
    for r in results:
        print(f"\nprompt:   {r['prompt']!r}")
        print(f"baseline: {r['baseline']!r}")
        print(f"steered:  {r['steered']!r}")
    return 0
