#!/usr/bin/env bash
# Build llama.cpp from source under /tmp (pinned commit) for checking lowbit's GGUF files with the
# real engine: llama-cli, llama-perplexity, llama-quantize, llama-imatrix, llama-tokenize, llama-bench.
#
#   bench/llama_cpp.sh                     # build into /tmp/llama.cpp/build/bin
#   AVX512=1 bench/llama_cpp.sh            # also AVX-512 (F, VNNI, BF16, VBMI; AMX still off) into build512/bin:
#                                          # the fair speed reference for lowbit's AVX-512 kernels
#   LOWBIT_LLAMA_CPP=/tmp/llama.cpp/build/bin python bench/gguf_check.py   # the checks
#
# Source: a git checkout of ggerganov/llama.cpp given as LLAMA_CPP_GIT (a bare git dir or clone);
# without it the script clones https://github.com/ggerganov/llama.cpp.
# The build is non-native with AMX off: on the dev box's CPU llama.cpp's AMX path returns garbage
# for Q4_0; AVX2/FMA/F16C stay on (the GGML_NATIVE=OFF defaults).
set -euo pipefail

COMMIT=c392e5094deaf2d1a7c18683214f007fad3fe42b   # master 2025-02-20 (b4747+1)
DEST=${LLAMA_CPP_DIR:-/tmp/llama.cpp}
JOBS=${JOBS:-2}
TARGETS=(llama-cli llama-perplexity llama-quantize llama-imatrix llama-tokenize llama-bench)

if [ ! -f "$DEST/CMakeLists.txt" ]; then
  mkdir -p "$DEST"
  if [ -n "${LLAMA_CPP_GIT:-}" ]; then
    # a partial mirror may lack big vocab test files and the kompute submodule: not needed to build
    git --git-dir="$LLAMA_CPP_GIT" archive "$COMMIT" -- . ':!models/*.gguf' ':!ggml/src/ggml-kompute/kompute' \
      | tar -x -C "$DEST"
  else
    tmp=$(mktemp -d)
    git clone --filter=blob:none https://github.com/ggerganov/llama.cpp "$tmp"
    git -C "$tmp" archive "$COMMIT" | tar -x -C "$DEST"
    rm -rf "$tmp"
  fi
  echo "$COMMIT" > "$DEST/COMMIT"
fi
if [ "$(cat "$DEST/COMMIT" 2>/dev/null)" != "$COMMIT" ]; then
  echo "$DEST holds another llama.cpp commit than $COMMIT; remove it or set LLAMA_CPP_DIR" >&2
  exit 1
fi

BUILD=build
ISA=()
if [ -n "${AVX512:-}" ]; then
  BUILD=build512
  ISA=(-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX512_VBMI=ON)
fi
cmake -S "$DEST" -B "$DEST/$BUILD" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF "${ISA[@]}" \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF
nice -n 10 cmake --build "$DEST/$BUILD" --config Release -j "$JOBS" --target "${TARGETS[@]}"
echo "llama.cpp $COMMIT built: $DEST/$BUILD/bin"
ls "$DEST/$BUILD/bin"
