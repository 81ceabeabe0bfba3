# Sourced by the other scripts: make sure the project's virtualenv exists and is up to date.
# torch/torchvision are pinned in constraints.txt (the releases on these machines' local disk).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ISVIT_VENV:-$ROOT/.venv}"
STAMP="$VENV/.isvit-installed"
if [ ! -x "$VENV/bin/python" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ] || [ "$ROOT/constraints.txt" -nt "$STAMP" ]; then
    echo "setting up $VENV (first run: a few minutes) ..." >&2
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" -e "$ROOT[test]" >&2
    touch "$STAMP"
fi
SHARED="${ISVIT_SHARED:-$ROOT/../shared}"
