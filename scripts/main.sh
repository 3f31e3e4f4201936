#!/usr/bin/env bash
# The main job: quantize SmolLM2-135M with lowbit's schemes and report what each costs.
source "$(dirname "$0")/env.sh"
exec .venv/bin/python -m lowbit.demo "$@"
