#!/usr/bin/env bash
# Prepares what benchmarks/gpu_check.sh needs on a GPU machine whose Python has PyTorch, transformers, pyarrow and
# the rest, but none of the project's pure-Python extras and no network (the lent H100/H200 machines):
#   .whl/            wheels of the missing packages, for that machine's Python (3.12 by default)
#   .gpu-tokenizer/  the packaged SmolLM2 tokenizer (the check's model has its vocabulary; the 93 MB GGUF stays here)
# Both are ignored by git; name them in the device tool's `carry` and run
#   GPU_CHECK_TOKENIZER=.gpu-tokenizer bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${GPU_PYTHON_VERSION:-3.12}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.gpu-tokenizer/' .git/info/exclude 2>/dev/null || echo '/.gpu-tokenizer/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp "${platforms[@]}" \
  -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection zstandard submitit
.venv/bin/python - <<'PY'
from pipeline.config import ModelConfig
from pipeline.extract.model import cache_root, dequantised_gguf_dir, smollm2_gguf
from transformers import AutoTokenizer
AutoTokenizer.from_pretrained(dequantised_gguf_dir(smollm2_gguf(), cache_root(ModelConfig()))).save_pretrained(".gpu-tokenizer")
PY
du -sh .whl .gpu-tokenizer
