"""`saepipe eval RUN [--store ROOT] [--contexts N] [--device D] [--out FILE] [--json]`: how faithful the SAE is to the
model. On held-out stored contexts, the SAE's reconstruction replaces the hooked layer's output and the model runs to
the end: clean CE, spliced CE, zero-ablation CE, ce_loss_score = (CE_zero - CE_sae)/(CE_zero - CE_clean),
KL(clean || spliced), kl_div_score = (KL_zero - KL_sae)/KL_zero, FVU and L0, all on the same tokens; BOS, the
positions extraction excluded and special tokens are left out (pipeline/analysis/spliced_eval.py says how).

RUN is a training run dir (results go to RUN/eval/spliced.json) or a SAELens-format SAE dir (then --out is needed,
and --store unless its cfg.json names an existing activation store). The model is the one the store records."""
from __future__ import annotations

import argparse
import json


def add_parser(subparsers, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser("eval", parents=[common], description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              help="CE loss and KL with the SAE spliced into the model (ce_loss_score, kl_div_score)")
    p.add_argument("run", help="training run dir, or a SAELens-format SAE dir")
    p.add_argument("--store", help="activation store root (default: the run's data.root)")
    p.add_argument("--contexts", type=int, default=64, help="held-out contexts to score (default 64)")
    p.add_argument("--batch-size", type=int, default=8, help="contexts per forward pass (default 8)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default auto)")
    p.add_argument("--out", help="results JSON (default RUN/eval/spliced.json for a training run)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.analysis.spliced_eval import format_table, run_spliced_eval

    result = run_spliced_eval(args.run, store=args.store, contexts=args.contexts, device=args.device, out=args.out,
                              batch_size=args.batch_size, show_progress=not args.no_progress)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
        print(f"written to {result['out']}")
    return 0
