#!/usr/bin/env bash
# Build llama.cpp's tools under /tmp for the benchmarks (llama-completion, llama-perplexity, llama-quantize,
# llama-imatrix, llama-tokenize, llama-bench), from the same llama.cpp the test suite judges with: the
# source that the llama-cpp-python sdist pinned in requirements/lock.txt vendors (vendor/llama.cpp).
#
#   bench/llama_cpp.sh                     # build into /tmp/llama.cpp/build/bin (about 4 minutes on 2 cores)
#   LOWBIT_LLAMA_CPP=/tmp/llama.cpp/build/bin python bench/gguf_check.py   # the checks
#
# The flags are the test suite's (scripts/env.sh): non-native AVX-512 (F, VNNI, BF16), AMX off (llama.cpp's
# AMX path returned garbage on this CPU family; a -march=native build dies with Illegal instruction
# on the Xeon). Only registries are reached: pip downloads the sdist.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=$(sed -n 's/^llama[-_]cpp[-_]python==//p' requirements/lock.txt)
DEST=${LLAMA_CPP_DIR:-/tmp/llama.cpp}
JOBS=${JOBS:-2}
TARGETS=(llama-completion llama-perplexity llama-quantize llama-imatrix llama-tokenize llama-bench)
PY=${PYTHON:-python3}

if [ "$(cat "$DEST/VERSION" 2>/dev/null)" != "llama-cpp-python $VERSION" ]; then
  rm -rf "$DEST"
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp"
  tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
  mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$DEST"
  rm -rf "$tmp"
  echo "llama-cpp-python $VERSION" > "$DEST/VERSION"
fi

cmake -S "$DEST" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF
nice -n 10 cmake --build "$DEST/build" --config Release -j "$JOBS" --target "${TARGETS[@]}"
echo "llama.cpp of llama-cpp-python $VERSION built: $DEST/build/bin"
ls "$DEST/build/bin"
