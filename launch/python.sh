# Sourced by the launch/ scripts: sets `root` to the repository root and `py` to the project's
# Python interpreter, the first of
#   $PYTHON; the active virtual environment ($VIRTUAL_ENV); python3 on PATH if memray is
#   installed there; this checkout's .venv (made by `bash .ci/setup`); python3.
# The scripts run Ray from that interpreter too.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
has_memray() { "$1" -c 'import importlib.metadata as m; m.version("memray-ft")' 2>/dev/null; }
if [ -n "${PYTHON:-}" ]; then
    py=$PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
    py=$VIRTUAL_ENV/bin/python
elif command -v python3 >/dev/null && has_memray python3; then
    py=$(command -v python3)
elif [ -x "$root/.venv/bin/python" ]; then
    py=$root/.venv/bin/python
else
    py=$(command -v python3 || true)
fi
if [ -z "$py" ] || ! command -v "$py" >/dev/null; then
    echo "launch: error: no Python interpreter for memray (PYTHON=${PYTHON:-unset}): make one with \`bash .ci/setup\`" >&2
    exit 2
fi
