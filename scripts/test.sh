#!/usr/bin/env bash
# The test suite (pytest). Extra arguments go to pytest, e.g. -k reparam or -m "not real".
# Two processes: the tests that load OpenVINO run after the rest, in a process of their own
# (tests/conftest.py says why). A part the arguments leave empty (pytest's exit code 5) is no
# failure unless both are.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
codes=()
for part in without only; do
    code=0
    "$VENV/bin/python" -m pytest -q --openvino "$part" "$@" || code=$?
    codes+=("$code")
done
for code in "${codes[@]}"; do
    if [ "$code" -ne 0 ] && [ "$code" -ne 5 ]; then exit "$code"; fi
done
if [ "${codes[0]}" -eq 5 ] && [ "${codes[1]}" -eq 5 ]; then exit 5; fi
exit 0
