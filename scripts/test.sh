#!/usr/bin/env bash
# The test suite (pytest). Extra arguments go to pytest, e.g. -k reparam or -m "not real".
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest -q "$@"
