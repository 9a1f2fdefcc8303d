#!/usr/bin/env bash
# The GPU check: the production path on one GPU, in under 8 minutes. Run it whenever a GPU is at hand and put its
# figures in the README; the project never depends on it.
#   1. bf16 extraction through a Llama-architecture model (Llama-3.2-3B's shape, random weights, truncated after
#      layer 16: the real extraction path, hook and store writer) from the bundled sample corpus;
#   2. a 65,536-latent TopK SAE trained for a few hundred steps on that store with bf16 autocast;
#   3. SIGUSR2 in the middle of training (submitit's requeue signal): exit 75 with a checkpoint, then --resume to the
#      end, checked against the step the signal landed on;
#   4. NVML visible (the GPU metrics issue 9's exporter reads).
# Prints one JSON line at the end (and writes it to $OUT/gpu_check.json when $OUT is set).
#
#   bash benchmarks/gpu_check.sh                 # on a GPU machine, from the repository root
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh   # the same steps at toy sizes on CPU, to check the script
#
# On a machine whose python lacks the project's pure-Python dependencies (pydantic, zstandard), put their wheels in
# .whl/ first (see benchmarks/gpu_wheels.sh); this script installs them into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
WORK=${GPU_CHECK_DIR:-$(mktemp -d /tmp/saepipe-gpu-check.XXXX)}
mkdir -p "$WORK"
SMOKE=${GPU_CHECK_SMOKE:-0}
exec $PY - "$WORK" "$SMOKE" <<'PYEOF'
import json, os, signal, subprocess, sys, time
from pathlib import Path

work, smoke = Path(sys.argv[1]), sys.argv[2] == "1"
import torch, yaml

t_all = time.perf_counter()
device = "cpu" if smoke else "cuda"
if not smoke and not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible (GPU_CHECK_SMOKE=1 runs the steps on CPU at toy sizes)")
result = {"device": torch.cuda.get_device_name(0) if not smoke else "cpu (smoke)", "torch": torch.__version__}

# ---- 4. NVML
try:
    import pynvml
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    mem = pynvml.nvmlDeviceGetMemoryInfo(h)
    result["nvml"] = {"name": pynvml.nvmlDeviceGetName(h), "memory_total_gib": round(mem.total / 2**30, 1),
                      "driver": pynvml.nvmlSystemGetDriverVersion()}
except Exception as err:  # noqa: BLE001 - reported, not fatal
    result["nvml"] = f"unavailable: {type(err).__name__}: {err}"

# ---- a Llama-architecture model at Llama-3.2-3B's width, with the packaged tokenizer's vocabulary
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from pipeline.config import ModelConfig
from pipeline.extract.model import cache_root, dequantised_gguf_dir, smollm2_gguf

model_dir = work / "llama-3b-shape"
tok_dir = Path(os.environ.get("GPU_CHECK_TOKENIZER", work / "tokenizer"))
if not tok_dir.is_dir():
    tok_src = dequantised_gguf_dir(smollm2_gguf(), cache_root(ModelConfig())) if not os.environ.get("GPU_CHECK_TOKENIZER") else tok_dir
    AutoTokenizer.from_pretrained(tok_src).save_pretrained(tok_dir)
tok = AutoTokenizer.from_pretrained(tok_dir)
layer = 2 if smoke else 16
shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2) if smoke else \
    dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8)
if not (model_dir / "config.json").exists():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), num_hidden_layers=layer + 1, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, rms_norm_eps=1e-5, **shape)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
d = shape["hidden_size"]

def saepipe(*args, **kw):
    return subprocess.run([sys.executable, "-m", "pipeline.cli.main", *args], capture_output=True, text=True, **kw)

# ---- 1. bf16 extraction
tokens = 20_000 if smoke else 600_000
store = work / "store"
extract_cfg = work / "extract.yaml"
extract_cfg.write_text(yaml.safe_dump({
    "corpus": {"paths": ["data/pile-sample/pile-sample-*.jsonl.zst"], "token_budget": tokens},
    "model": {"name": str(model_dir), "dtype": "bfloat16", "device": device},
    "extract": {"layer": layer, "ctx_len": 1024, "batch_size": 32},
    "store": {"root": str(store), "contexts_per_shard": 64, "row_group_rows": 1024 if smoke else 8192,
              "writer_threads": 1 if smoke else 8, "max_pending_shards": 3},
}))
t0 = time.perf_counter()
run = saepipe("extract", str(extract_cfg), "--no-progress")
if run.returncode:
    sys.exit(f"gpu_check: extraction failed ({run.returncode}):\n{run.stderr[-3000:]}")
manifest = json.loads(next(store.glob("tasks/*/manifest.json")).read_text())
result["extract"] = {"tokens": manifest["rows"], "wall_seconds": round(time.perf_counter() - t0, 1),
                     "tokens_per_second": manifest["stats"]["tokens_per_second"],
                     "forward_seconds": manifest["stats"]["forward_seconds"], "shards": len(manifest["shards"]),
                     "store_bytes": manifest["bytes"], "d_model": d}

# ---- 2 + 3. TopK SAE, bf16 autocast, SIGUSR2 mid-run, resume
steps = 3000 if smoke else 400  # long enough for a signal sent from outside to land mid-run
run_dir = work / "sae"
train_cfg = work / "train.yaml"
train_cfg.write_text(yaml.safe_dump({
    "run_dir": str(run_dir), "resume": "auto",
    "data": {"root": str(store), "eval_shards": 1, "partitions": 2 if smoke else 8, "init_rows": 16384},
    "sae": {"arch": "topk", "d_in": d, "d_sae": 1024 if smoke else 65536, "k": 8 if smoke else 64,
            "dead_tokens": 200_000},
    "train": {"batch_size": 512 if smoke else 4096, "steps": steps, "lr": 1e-4, "warmup_steps": 20,
              "precision": "bf16", "device": device, "log_every": 10},
    "eval": {"max_rows": 16384, "batch_size": 4096},
    "checkpoint": {"every_steps": 1000, "keep_last": 2},
}))
env = dict(os.environ)
t0 = time.perf_counter()
proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli.main", "train", str(train_cfg), "--no-progress"],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
metrics = run_dir / "metrics.jsonl"
target = steps // 2
sent_at = None
while proc.poll() is None:
    time.sleep(0.5)
    if metrics.exists():
        logged = [json.loads(l) for l in metrics.read_text().splitlines() if '"loss"' in l]
        if logged and logged[-1]["step"] >= target and sent_at is None:
            proc.send_signal(signal.SIGUSR2)
            sent_at = logged[-1]["step"]
out = proc.communicate()[0]
first_wall = time.perf_counter() - t0
if proc.returncode != 75:
    sys.exit(f"gpu_check: training should have stopped with 75 after SIGUSR2, got {proc.returncode}:\n{out[-3000:]}")
ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
stopped_step = int(ckpts[-1].name.split("_")[1])
logged = [json.loads(l) for l in metrics.read_text().splitlines() if '"loss"' in l]
t1 = time.perf_counter()
run = saepipe("train", str(train_cfg), "--no-progress", "--resume")
if run.returncode:
    sys.exit(f"gpu_check: resume failed ({run.returncode}):\n{run.stderr[-3000:]}")
status = json.loads((run_dir / "status.json").read_text())
records = [json.loads(l) for l in metrics.read_text().splitlines() if '"loss"' in l]
tps = [r["tokens_per_s"] for r in records if r["step"] > 20]
result["train"] = {
    "d_sae": 1024 if smoke else 65536, "steps": status["step"], "precision": "bf16 autocast",
    "signal_after_step": sent_at, "checkpointed_step": stopped_step, "resumed_to": status["step"],
    "first_run_seconds": round(first_wall, 1), "resume_run_seconds": round(time.perf_counter() - t1, 1),
    "tokens_per_s_median": round(sorted(tps)[len(tps) // 2]) if tps else None,
    "step_seconds_median": round(sorted(r["step_seconds"] for r in records)[len(records) // 2], 4),
    "data_wait_seconds_median": round(sorted(r["data_wait_seconds"] for r in records)[len(records) // 2], 4),
    "final_loss": records[-1]["loss"], "first_loss": records[0]["loss"],
    "eval": {k: status["eval"][k] for k in ("fvu", "l0", "dead_pct")},
    "finite": all(r["loss"] == r["loss"] and abs(r["loss"]) != float("inf") for r in records),
}
result["wall_seconds"] = round(time.perf_counter() - t_all, 1)
result["ok"] = (result["train"]["finite"] and stopped_step >= (sent_at or 0) and status["step"] == steps
                and records[-1]["loss"] < records[0]["loss"])
line = json.dumps(result)
print(line)
if os.environ.get("OUT"):
    Path(os.environ["OUT"], "gpu_check.json").write_text(line + "\n")
PYEOF
