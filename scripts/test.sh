#!/usr/bin/env bash
# The whole test suite.
source "$(dirname "$0")/env.sh"
# The report test renders lowbit's HTML page in a real headless browser: Debian's chromium,
# installed here where we can (CI runs as root on Debian); elsewhere that test says what is missing.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "scripts/test.sh: could not install chromium; the report browser test will fail" >&2
fi
exec .venv/bin/python -m pytest -q "$@"
