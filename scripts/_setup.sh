# Sourced by scripts/serve and scripts/test: a virtual environment with the project in it.
# Creates .venv when missing, installs the CPU build of torch first (so that installing the
# project never pulls a multi-GB CUDA build), then the project with its test extras; reinstalls
# when pyproject.toml changed. PYTHON, TORCH_INDEX_URL override the defaults.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" >/dev/null 2>&1; then
    # Plain `pip install torch==2.13.0` takes the CPU wheel where the machine provides one
    # (find-links); elsewhere set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu.
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        pip install --quiet torch==2.13.0 --index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple
    else
        pip install --quiet torch==2.13.0
    fi
fi
stamp=.venv/.spine-node-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || ! command -v spine-node >/dev/null; then
    pip install --quiet -e '.[test]'
    touch "$stamp"
fi
# Debian's dcmtk leaves Nagle's algorithm on; this makes storescu/echoscu/storescp send at once.
export TCP_NODELAY=1
