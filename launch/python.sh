# Sourced by the launch/ scripts: sets `py` to the project's Python interpreter, the first of
#   $PYTHON; the active virtual environment ($VIRTUAL_ENV); the checkout's .venv (made by
#   `bash .ci/setup --cluster`); python3 on PATH.
# and `root` to the repository root. The scripts run Ray from that interpreter too.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${PYTHON:-}" ]; then
    py=$PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
    py=$VIRTUAL_ENV/bin/python
elif [ -x "$root/.venv/bin/python" ]; then
    py=$root/.venv/bin/python
else
    py=$(command -v python3 || true)
fi
if [ -z "$py" ] || ! command -v "$py" >/dev/null; then
    echo "launch: error: no Python interpreter for memray (PYTHON=${PYTHON:-unset}): make one with \`bash .ci/setup --cluster\`" >&2
    exit 2
fi
