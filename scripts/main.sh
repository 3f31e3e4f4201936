#!/usr/bin/env bash
# The main job: quantize SmolLM2-135M with several recipes, evaluate each against fp32 on the
# built-in text (Python's own documentation), and print one table. Extra arguments go to
# `lowbit compare` (e.g. --recipes w8,w4g64:hqq --windows 8).
source "$(dirname "$0")/env.sh"
exec .venv/bin/lowbit compare smollm2-135m "$@"
