"""Builds saepipe's Grafana dashboards with Grafana's typed Python SDK (grafana-foundation-sdk) and writes their JSON
into monitoring/grafana/dashboards/, where Grafana's file provider (provisioning/dashboards/saepipe.yml) loads them.

    python monitoring/grafana/build_dashboards.py           # (re)write the JSON files
    python monitoring/grafana/build_dashboards.py --check   # exit 1 if a committed file differs from what it builds

The JSON files are generated: change this script, then rerun it. Metric and label names: monitoring/METRICS.md.

For tests and live checks: `build_all()` returns every dashboard as a plain dict, `panel_queries(dashboard)` lists
its (panel title, PromQL expr) pairs and `concrete(expr)` substitutes the Grafana variables so that Prometheus
itself can evaluate an expr.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import gauge, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders.common import ReduceDataOptions, VizLegendOptions
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import BigValueColorMode, BigValueGraphMode, LegendDisplayMode
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync, DashboardLinkType, DataSourceRef, DataTransformerConfig, DynamicConfigValue, Threshold,
    ThresholdsMode, ValueMap, ValueMappingResult, VariableRefresh, VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUT_DIR = Path(__file__).resolve().parent / "dashboards"

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RUN = 'job="saepipe", run=~"$run"'
STAGE = 'stage=~"$stage"'
DATA_WAIT = 'phase="data_wait"'
UNCORRECTED = 'kind="uncorrected"'
HOST = 'host=~"$host"'
# node-exporter series have no run label; prometheus.yml gives them `host` (when a node is listed by name), and the
# `host` variable lists the selected runs' hosts, so this keeps the node panels to the nodes the runs use.
NODE = 'job="node", host=~"$host"'
# The labels that tell one exporter (extraction task or training rank) from another, as the task table shows them.
TASK = "run, stage, task, rank, host, slurm_job_id"
# No batch/step for this long while not finished: the same threshold as the SaepipeNoProgress alert.
STALL_S = 600


def m(metric: str, *matchers: str) -> str:
    """A selector of a saepipe metric, restricted to the saepipe scrape job and the selected runs."""
    return f"{metric}{{{', '.join((RUN, *matchers))}}}"


def age(timestamp: str, *matchers: str) -> str:
    # A timestamp gauge is 0 until the first batch/shard/checkpoint: count from the job's start until then, on the
    # exporters that have the gauge at all (a shard age for extraction tasks only, a checkpoint age for training).
    ts = m(timestamp, *matchers)
    return f"time() - (({ts} > 0) or ({m('saepipe_job_start_time_seconds', *matchers)} and on(job, instance) {ts}))"


def _targets(panel, queries, instant: bool = False):
    for i, (expr, legend) in enumerate(queries):
        q = prometheus.Dataquery().expr(expr).ref_id(chr(ord("A") + i))
        if legend:
            q = q.legend_format(legend)
        if instant:
            q = q.instant().format(PromQueryFormat.TABLE)
        panel = panel.with_target(q)
    return panel


def _thresholds(*steps: tuple[float | None, str]) -> dash.ThresholdsConfig:
    return dash.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps([Threshold(v, c) for v, c in steps])


def ts(title: str, queries: list[tuple[str, str]], unit: str = "short", w: int = 12, h: int = 8,
       description: str | None = None, lo: float | None = None, hi: float | None = None) -> timeseries.Panel:
    p = (timeseries.Panel().title(title).datasource(DATASOURCE).unit(unit).span(w).height(h)
         .legend(VizLegendOptions().show_legend(True).display_mode(LegendDisplayMode.LIST)))
    if description:
        p = p.description(description)
    if lo is not None:
        p = p.min(lo)
    if hi is not None:
        p = p.max(hi)
    return _targets(p, queries)


def st(title: str, queries: list[tuple[str, str]], unit: str = "short", w: int = 4, h: int = 4,
       description: str | None = None, thresholds: dash.ThresholdsConfig | None = None) -> stat.Panel:
    p = (stat.Panel().title(title).datasource(DATASOURCE).unit(unit).span(w).height(h)
         .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]))
         .graph_mode(BigValueGraphMode.AREA).color_mode(BigValueColorMode.VALUE)
         .thresholds(thresholds or _thresholds((None, "green"))))
    if description:
        p = p.description(description)
    return _targets(p, queries)


def gg(title: str, queries: list[tuple[str, str]], unit: str, min_val: float, max_val: float,
       thresholds: dash.ThresholdsConfig, w: int = 12, h: int = 8) -> gauge.Panel:
    p = (gauge.Panel().title(title).datasource(DATASOURCE).unit(unit).min(min_val).max(max_val).span(w).height(h)
         .reduce_options(ReduceDataOptions().calcs(["lastNotNull"])).thresholds(thresholds))
    return _targets(p, queries)


def _variables(*extra) -> list:
    return [
        dash.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        dash.QueryVariable("run").label("Run").datasource(DATASOURCE)
        .query("label_values(saepipe_job_info, run)")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
        .multi(True).include_all(True).all_value(".*"),
        *extra,
    ]


def _host_variable():
    # No allValue: "All" then expands to the selected runs' hosts, not to every host Prometheus knows (which matters
    # for node-exporter series, which the run filter does not reach).
    return (dash.QueryVariable("host").label("Host").datasource(DATASOURCE)
            .query('label_values(saepipe_job_info{run=~"$run"}, host)')
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True).include_all(True))


def _dashboard(uid: str, title: str, description: str, variables: list, layout: list) -> dict:
    """`layout`: panel builders, or (row title, [panel builders]) for a collapsed row."""
    b = (dash.Dashboard(title).uid(uid).description(description).tags(["saepipe"])
         # Generated from this script: edits made in the UI would be lost on the next provisioning reload.
         .readonly().time("now-6h", "now").refresh("30s").timezone("browser")
         .tooltip(DashboardCursorSync.CROSSHAIR).variables(variables)
         .link(dash.DashboardLink("saepipe").type(DashboardLinkType.DASHBOARDS).tags(["saepipe"])
               .as_dropdown(True).include_vars(True).keep_time(True)))
    # The SDK leaves panel ids to Grafana; fixed ones keep links to a panel (viewPanel=<id>) stable across reloads.
    next_id = 1
    for item in layout:
        if isinstance(item, tuple):
            row = dash.Row(item[0]).id(next_id)
            next_id += 1
            for panel in item[1]:
                row = row.with_panel(panel.id(next_id))
                next_id += 1
            b = b.with_row(row)
        else:
            b = b.with_panel(item.id(next_id))
            next_id += 1
    return json.loads(json.dumps(b.build(), cls=JSONEncoder))


def run_overview() -> dict:
    by_task = f"max by ({TASK})"
    rate = f"deriv({m('saepipe_progress_done', STAGE)}[10m])"
    remaining = f"({m('saepipe_progress_target', STAGE)} - {m('saepipe_progress_done', STAGE)})"
    # ETA over a fixed 10-minute window rather than $__rate_interval: the estimate should not change with the
    # dashboard's time range, and a short window makes it jump with every batch.
    eta = f"{remaining} / ({rate} > 0)"
    progress = f"100 * {m('saepipe_progress_done', STAGE)} / ({m('saepipe_progress_target', STAGE)} > 0)"
    progress_age = age("saepipe_last_progress_time_seconds", STAGE)
    running = f"{m('saepipe_finished', STAGE)} == 0"
    task_legend = "{{run}} {{stage}} task {{task}} rank {{rank}}"
    state_map = ValueMap({"0": ValueMappingResult(text="running", color="blue", index=0),
                          "1": ValueMappingResult(text="finished", color="green", index=1)})
    columns = {"Value #A": "Progress", "Value #B": "State", "Value #C": "Rate (/s)", "Value #D": "ETA",
               "Value #E": "Last progress", "Value #F": "Requeues"}
    tasks = (table.Panel().title("Tasks").datasource(DATASOURCE).span(24).height(10)
             .description("One row per extraction task / training rank; Rate is tokens/s (extract) or steps/s (train).")
             .with_transformation(DataTransformerConfig(id_val="merge", options={}))
             .with_transformation(DataTransformerConfig(id_val="organize", options={
                 "excludeByName": {"Time": True}, "renameByName": columns}))
             .override_by_name("Progress", [DynamicConfigValue("unit", "percent"), DynamicConfigValue("decimals", 1)])
             .override_by_name("State", [DynamicConfigValue("mappings", [state_map])])
             .override_by_name("ETA", [DynamicConfigValue("unit", "s")])
             .override_by_name("Last progress", [
                 DynamicConfigValue("unit", "s"),
                 DynamicConfigValue("custom.cellOptions", {"type": "color-text"}),
                 DynamicConfigValue("thresholds", _thresholds((None, "green"), (STALL_S, "red")).build())]))
    tasks = _targets(tasks, [
        (f"{by_task} ({progress})", ""),
        (f"{by_task} ({m('saepipe_finished', STAGE)})", ""),
        (f"{by_task} ({rate})", ""),
        (f"{by_task} ({eta})", ""),
        (f"{by_task} ({progress_age})", ""),
        (f"{by_task} ({m('saepipe_requeues', STAGE)})", ""),
    ], instant=True)
    return _dashboard(
        "saepipe-run-overview", "saepipe / Run overview",
        "Progress, throughput, ETA and health of every extraction task and training rank of the selected runs.",
        _variables(dash.CustomVariable("stage").label("Stage").values("extract,train")
                   .multi(True).include_all(True).all_value(".*")),
        [
            st("Running", [(f"count({running}) or vector(0)", "running")]),
            st("Finished", [(f"count({m('saepipe_finished', STAGE)} == 1) or vector(0)", "finished")]),
            st("Stalled", [(f"count(({progress_age}) > {STALL_S} and on(job, instance) {running}) or vector(0)",
                            "stalled")],
               description=f"Running tasks without a batch/step for {STALL_S} s.",
               thresholds=_thresholds((None, "green"), (1, "red"))),
            st("Requeues", [(f"sum({m('saepipe_requeues', STAGE)}) or vector(0)", "requeues")],
               thresholds=_thresholds((None, "green"), (1, "orange"))),
            st("Progress", [(f"100 * sum by (run, stage) ({m('saepipe_progress_done', STAGE)})"
                             f" / sum by (run, stage) ({m('saepipe_progress_target', STAGE)})", "{{run}} {{stage}}")],
               unit="percent"),
            st("ETA (slowest task)", [(f"max by (run, stage) ({eta})", "{{run}} {{stage}}")], unit="s"),
            ts("Progress per task", [(progress, task_legend)], unit="percent", lo=0, hi=100),
            ts("Time since last progress", [(progress_age, task_legend)], unit="s", lo=0,
               description="Seconds since the task's last batch (extract) or step (train)."),
            ts("Extraction throughput (tokens/s)", [
                (f"sum by (run, task) (rate({m('saepipe_extract_tokens_total', STAGE)}[$__rate_interval]))",
                 "{{run}} task {{task}}"),
                (f"sum by (run) (rate({m('saepipe_extract_tokens_total', STAGE)}[$__rate_interval]))",
                 "{{run}} total"),
            ], lo=0),
            # The step is a gauge (it goes back to the checkpoint's step after a requeue): deriv, not rate.
            ts("Training throughput (steps/s)", [
                (f"max by (run) (deriv({m('saepipe_train_step', STAGE)}[$__rate_interval]))", "{{run}}"),
            ], lo=0),
            ts("ETA per task", [(eta, task_legend)], unit="s", lo=0,
               description="Remaining tokens/steps over the last 10 minutes' rate."),
            ts("Time since last shard / checkpoint", [
                (age("saepipe_extract_last_shard_time_seconds", STAGE), "{{run}} shard, task {{task}}"),
                (age("saepipe_train_last_checkpoint_time_seconds", STAGE), "{{run}} checkpoint, rank {{rank}}"),
            ], unit="s", lo=0),
            # Sums rather than counts of a filter, so that the panels show 0 instead of "no data".
            ts("Requeues", [(f"sum by (run, stage) ({m('saepipe_requeues', STAGE)})", "{{run}} {{stage}}")], lo=0),
            ts("Running / finished tasks", [
                (f"sum by (run, stage) (1 - {m('saepipe_finished', STAGE)})", "{{run}} {{stage}} running"),
                (f"sum by (run, stage) ({m('saepipe_finished', STAGE)})", "{{run}} {{stage}} finished"),
            ], lo=0),
            tasks,
        ])


def training() -> dict:
    t = "saepipe_train"
    # Every rank of a run exports the same training values (the trainer averages them over ranks first), so
    # aggregating by run keeps one series per run instead of one per rank.
    return _dashboard(
        "saepipe-training", "saepipe / Training",
        "SAE training: losses, sparsity, reconstruction quality, optimiser, step time and checkpoints.",
        _variables(),
        [
            st("Progress", [(f"100 * max by (run) ({m(t + '_step')}) / max by (run) ({m(t + '_target_steps')})",
                             "{{run}}")], unit="percent", w=6),
            st("Tokens/s", [(f"max by (run) ({m(t + '_tokens_per_second')})", "{{run}}")], w=6),
            st("Eval FVU", [(f"max by (run) ({m(t + '_eval_fvu')})", "{{run}}")], unit="none", w=6),
            st("Checkpoints", [(f"max by (run) ({m(t + '_checkpoints_total')})", "{{run}}")], w=6),
            ts("Loss by term", [(f"avg by (run, term) ({m(t + '_loss')})", "{{run}} {{term}}")]),
            ts("L0 (active latents per token)", [
                (f"avg by (run) ({m(t + '_l0')})", "{{run}} train"),
                (f"max by (run) ({m(t + '_eval_l0')})", "{{run}} eval"),
            ], lo=0),
            ts("Dead latents", [
                (f"max by (run) ({m(t + '_dead_ratio')})", "{{run}} train"),
                (f"max by (run) ({m(t + '_eval_dead_ratio')})", "{{run}} eval"),
            ], unit="percentunit", lo=0, hi=1),
            ts("FVU (fraction of variance unexplained)", [
                (f"avg by (run) ({m(t + '_fvu')})", "{{run}} train"),
                (f"max by (run) ({m(t + '_eval_fvu')})", "{{run}} eval"),
            ], unit="none", lo=0),
            ts("Learning rate", [(f"max by (run) ({m(t + '_learning_rate')})", "{{run}}")], unit="none", lo=0),
            ts("Gradient norm", [(f"max by (run) ({m(t + '_grad_norm')})", "{{run}}")], unit="none", lo=0),
            ts("Step time by phase", [
                (f"avg by (run, phase) ({m(t + '_step_seconds')})", "{{run}} {{phase}}"),
            ], unit="s", lo=0, description="Mean seconds per step waiting for data vs computing, over ranks."),
            ts("Data-wait share per rank", [
                (f"sum without (phase) ({m(t + '_step_seconds', DATA_WAIT)})"
                 f" / sum without (phase) ({m(t + '_step_seconds')})", "{{run}} rank {{rank}}"),
            ], unit="percentunit", lo=0, hi=1,
               description="High: the input pipeline (store reads) limits training on that rank."),
            ts("Tokens/s", [
                (f"max by (run) (rate({m(t + '_tokens_total')}[$__rate_interval]))", "{{run}}"),
                (f"max by (run) ({m(t + '_tokens_per_second')})", "{{run}} (exporter)"),
            ], lo=0),
            ts("Checkpoint age vs expected interval", [
                (f"max by (run) ({age(t + '_last_checkpoint_time_seconds')})", "{{run}} since last"),
                (f"max by (run) ({m(t + '_checkpoint_interval_seconds')})", "{{run}} expected interval"),
            ], unit="s", lo=0),
            ts("Checkpoint duration", [(f"max by (run) ({m(t + '_checkpoint_duration_seconds')})", "{{run}}")],
               unit="s", lo=0),
        ])


def gpus() -> dict:
    g = "saepipe_gpu"
    # One series per GPU even where two exporters (ranks) on a host report the same device.
    per_gpu = "max by (host, gpu)"
    legend = "{{host}} GPU {{gpu}}"
    return _dashboard(
        "saepipe-gpus", "saepipe / GPUs",
        "Per host and GPU (NVML, from the saepipe exporters): utilisation, memory, power, temperature, clock, ECC.",
        _variables(_host_variable()),
        [
            st("GPUs", [(f"count({per_gpu} ({m(g + '_utilization_ratio', HOST)}))", "GPUs")], w=6),
            st("Mean utilisation", [(f"avg({per_gpu} ({m(g + '_utilization_ratio', HOST)}))", "mean")],
               unit="percentunit", w=6,
               thresholds=_thresholds((None, "red"), (0.2, "orange"), (0.6, "green"))),
            st("Memory used", [(f"sum({per_gpu} ({m(g + '_memory_used_bytes', HOST)}))", "used")], unit="bytes",
               w=6),
            st("Uncorrected ECC errors", [
                (f"sum({per_gpu} ({m(g + '_ecc_errors_total', HOST, UNCORRECTED)})) or vector(0)",
                 "uncorrected")], w=6, thresholds=_thresholds((None, "green"), (1, "red"))),
            ts("Utilisation", [(f"{per_gpu} ({m(g + '_utilization_ratio', HOST)})", legend)],
               unit="percentunit", lo=0, hi=1),
            ts("Memory used / total", [
                (f"{per_gpu} ({m(g + '_memory_used_bytes', HOST)})", legend + " used"),
                (f"{per_gpu} ({m(g + '_memory_total_bytes', HOST)})", legend + " total"),
            ], unit="bytes", lo=0),
            gg("Memory used (share)", [
                (f"{per_gpu} ({m(g + '_memory_used_bytes', HOST)}) / {per_gpu} ({m(g + '_memory_total_bytes', HOST)})",
                 legend)], "percentunit", 0, 1, _thresholds((None, "green"), (0.9, "orange"), (0.97, "red")), w=24, h=6),
            ts("Power", [(f"{per_gpu} ({m(g + '_power_watts', HOST)})", legend)], unit="watt", lo=0),
            ts("Temperature", [(f"{per_gpu} ({m(g + '_temperature_celsius', HOST)})", legend)], unit="celsius"),
            ts("SM clock", [(f"{per_gpu} ({m(g + '_sm_clock_hertz', HOST)})", legend)], unit="hertz", lo=0),
            ts("ECC errors (since driver load)", [
                (f"max by (host, gpu, kind) ({m(g + '_ecc_errors_total', HOST)})", legend + " {{kind}}"),
            ], lo=0),
        ])


def hosts() -> dict:
    # Host-wide values are reported by every exporter on the host: max by (host) keeps one series per host.
    proc = "{{host}} {{stage}} task {{task}} rank {{rank}}"
    fs_free = f"max by (host, path) ({m('saepipe_filesystem_free_bytes', HOST)})"
    fs_size = f"max by (host, path) ({m('saepipe_filesystem_size_bytes', HOST)})"
    net = "max by (host) (rate({}[$__rate_interval]))"
    node_fs = 'fstype!~"tmpfs|overlay|squashfs|devtmpfs"'
    return _dashboard(
        "saepipe-hosts", "saepipe / Hosts",
        "The hosts of the selected runs: CPU, memory, disk, file system and network, from the saepipe exporters "
        "(psutil) and, in the collapsed row, node-exporter.",
        _variables(_host_variable()),
        [
            ts("Host CPU", [(f"max by (host) ({m('saepipe_host_cpu_utilization_ratio', HOST)})", "{{host}}")],
               unit="percentunit", lo=0, hi=1),
            ts("Process CPU (cores)", [
                (f"rate({m('saepipe_process_cpu_seconds_total', HOST)}[$__rate_interval])", proc)], lo=0),
            ts("Host memory used / total", [
                (f"max by (host) ({m('saepipe_host_memory_used_bytes', HOST)})", "{{host}} used"),
                (f"max by (host) ({m('saepipe_host_memory_total_bytes', HOST)})", "{{host}} total"),
            ], unit="bytes", lo=0),
            ts("Process resident memory", [(m("saepipe_process_resident_memory_bytes", HOST), proc)],
               unit="bytes", lo=0),
            ts("Process disk read / write", [
                (f"rate({m('saepipe_process_disk_read_bytes_total', HOST)}[$__rate_interval])", proc + " read"),
                (f"rate({m('saepipe_process_disk_written_bytes_total', HOST)}[$__rate_interval])", proc + " write"),
            ], unit="Bps", lo=0),
            ts("Host network", [
                (net.format(m("saepipe_host_network_received_bytes_total", HOST)), "{{host}} received"),
                (net.format(m("saepipe_host_network_sent_bytes_total", HOST)), "{{host}} sent"),
            ], unit="Bps", lo=0),
            ts("Run file system free", [(fs_free, "{{host}} {{path}}")], unit="bytes", lo=0),
            gg("Run file system free (share)", [(f"{fs_free} / {fs_size}", "{{host}} {{path}}")], "percentunit", 0, 1,
               _thresholds((None, "red"), (0.05, "orange"), (0.15, "green"))),
            ("node-exporter", [
                ts("CPU busy", [
                    (f'1 - avg by (host) (rate(node_cpu_seconds_total{{{NODE}, mode="idle"}}[$__rate_interval]))',
                     "{{host}}")], unit="percentunit", lo=0, hi=1),
                ts("Memory used / total", [
                    (f"node_memory_MemTotal_bytes{{{NODE}}} - node_memory_MemAvailable_bytes{{{NODE}}}",
                     "{{host}} used"),
                    (f"node_memory_MemTotal_bytes{{{NODE}}}", "{{host}} total"),
                ], unit="bytes", lo=0),
                ts("Disk read / write", [
                    (f"sum by (host) (rate(node_disk_read_bytes_total{{{NODE}}}[$__rate_interval]))", "{{host}} read"),
                    (f"sum by (host) (rate(node_disk_written_bytes_total{{{NODE}}}[$__rate_interval]))",
                     "{{host}} write"),
                ], unit="Bps", lo=0),
                ts("File system free", [
                    (f"node_filesystem_avail_bytes{{{NODE}, {node_fs}}} / node_filesystem_size_bytes{{{NODE}, {node_fs}}}",
                     "{{host}} {{mountpoint}}")], unit="percentunit", lo=0, hi=1),
                ts("Network", [
                    (f'sum by (host) (rate(node_network_receive_bytes_total{{{NODE}, device!="lo"}}[$__rate_interval]))',
                     "{{host}} received"),
                    (f'sum by (host) (rate(node_network_transmit_bytes_total{{{NODE}, device!="lo"}}[$__rate_interval]))',
                     "{{host}} sent"),
                ], unit="Bps", lo=0),
            ]),
        ])


def build_all() -> dict[str, dict]:
    """File name -> dashboard JSON (a plain dict), for every dashboard this script writes."""
    return {"run-overview.json": run_overview(), "training.json": training(), "gpus.json": gpus(),
            "hosts.json": hosts()}


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) for every Prometheus target of every panel of `dashboard` (a dict as build_all returns
    or Grafana stores it), including panels nested in rows, in layout order. The exprs are as Grafana sends them
    before variable interpolation: pass one through `concrete` to query Prometheus directly."""
    out: list[tuple[str, str]] = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            for target in panel.get("targets") or []:
                if "expr" in target:
                    out.append((panel.get("title", ""), target["expr"]))
            walk(panel.get("panels") or [])

    walk(dashboard.get("panels") or [])
    return out


def concrete(expr: str, values: dict[str, str] | None = None, rate_interval: str = "1m") -> str:
    """`expr` with Grafana's variables replaced as Grafana would before sending it to Prometheus: $__rate_interval
    and $__interval by `rate_interval`, a dashboard variable ($run, $stage, $host; each used only inside a =~ matcher)
    by `values[name]` (a regex, e.g. a run name) or, when not given, by ".*" (the "All" choice)."""
    values = values or {}
    expr = re.sub(r"\$__(rate_interval|interval)\b", rate_interval, expr)
    return re.sub(r"\$(?:\{(run|stage|host)\}|(run|stage|host)\b)",
                  lambda match: values.get(match.group(1) or match.group(2), ".*"), expr)


def render(dashboard: dict) -> str:
    return json.dumps(dashboard, sort_keys=True, indent=2) + "\n"


def main(argv: list[str] | None = None, out_dir: Path = OUT_DIR) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed file differs; write nothing")
    args = parser.parse_args(argv)
    stale = []
    for name, board in build_all().items():
        path = out_dir / name
        text = render(board)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
                print(f"{path} differs from what {Path(__file__).name} builds", file=sys.stderr)
        else:
            out_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("rerun: python monitoring/grafana/build_dashboards.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
