#!/usr/bin/env bash
# The whole test suite.
source "$(dirname "$0")/env.sh"
exec .venv/bin/python -m pytest -q "$@"
