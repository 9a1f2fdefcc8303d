"""`saepipe monitor up|down|status`: a local Prometheus, Alertmanager and node-exporter on loopback with the
project's configs (monitoring/), for users without Docker (docker-compose.monitoring.yml is the other way). Jobs
announce themselves in the targets directory (telemetry.targets_dir; $SAEPIPE_TARGETS_DIR or
~/.saepipe/prometheus-targets), which Prometheus watches."""
from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("monitor", parents=[common], description=__doc__, help="local Prometheus + Alertmanager")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--state-dir", default="~/.saepipe/monitor", help="configs, data, logs and pid files")
    p.add_argument("--targets-dir", default=None, help="the jobs' file_sd directory (default: the telemetry default)")
    p.add_argument("--bind", default="127.0.0.1", help="address every daemon listens on")
    p.add_argument("--prometheus-port", type=int, default=9090)
    p.add_argument("--alertmanager-port", type=int, default=9093)
    p.add_argument("--node-exporter-port", type=int, default=9100)
    p.add_argument("--scrape-interval", default="15s")
    p.add_argument("--evaluation-interval", default="15s")
    p.add_argument("--rules", action="append", default=[], help="a further alert rule file (repeatable)")
    p.add_argument("--webhook", default=None, help="the Alertmanager webhook receiver's URL")
    p.add_argument("--group-wait", default=None, help="Alertmanager's group_wait and group_interval (e.g. 1s)")
    p.add_argument("--json", action="store_true", help="status as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.config.telemetry import default_targets_dir
    from pipeline.telemetry import stack

    state_dir = str(Path(args.state_dir).expanduser())
    recorded = stack.load_settings(state_dir)
    if args.action != "up" and recorded is not None:
        settings = recorded
    else:
        settings = stack.StackSettings(
            state_dir=state_dir, targets_dir=str(Path(args.targets_dir or default_targets_dir()).expanduser()),
            bind=args.bind, prometheus_port=args.prometheus_port, alertmanager_port=args.alertmanager_port,
            node_exporter_port=args.node_exporter_port, scrape_interval=args.scrape_interval,
            evaluation_interval=args.evaluation_interval, extra_rules=args.rules, webhook=args.webhook,
            group_wait=args.group_wait)
    if args.action == "down":
        stopped = stack.down(settings)
        print(f"stopped {', '.join(stopped) if stopped else 'nothing (none was running)'}")
        return 0
    info = stack.up(settings) if args.action == "up" else stack.status(settings)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for name, d in info["daemons"].items():
        print(f"{name:14} {'running, pid ' + str(d['pid']) if d['pid'] else 'not running'}")
    print(f"prometheus     {info['prometheus']}   alertmanager {info['alertmanager']}")
    print(f"targets        {len(info['targets'])} in {info['targets_dir']}")
    for t in info["targets"]:
        labels = t["labels"]
        print(f"  {t['target']:22} run={labels.get('run')} stage={labels.get('stage')} task={labels.get('task')} "
              f"rank={labels.get('rank')} slurm_job_id={labels.get('slurm_job_id') or '-'}")
    firing = [a for a in info.get("alerts") or [] if a["state"] == "firing"]
    print(f"alerts         {len(firing)} firing" + "".join(f"\n  {a['name']} {a['labels']}" for a in firing))
    return 0 if args.action == "status" or all(d["pid"] for d in info["daemons"].values()) else 1
