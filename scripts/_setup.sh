# Sourced by scripts/serve and scripts/test: a virtual environment with the project in it.
# Creates .venv when missing, installs torch first, then the project with its test extras;
# reinstalls the project when pyproject.toml changed. Each step it takes is one line on stderr.
#
# Which torch build: torch is installed once (when .venv has none), by pip, so TORCH_INDEX_URL
# or pip's own configuration decides. TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu gives
# the CPU build, .../whl/cu128 (for example) a CUDA build; unset, pip takes the best wheel it
# finds: a +cpu wheel in its configured find-links where there is one, else PyPI's, which on
# Linux x86-64 is the CUDA build (several GB). To change builds, remove .venv. PYTHON overrides
# the interpreter (default python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
_setup_say() { echo "scripts/_setup.sh: $*" >&2; }
if [ ! -x .venv/bin/python ]; then
    _setup_say "creating the virtual environment .venv (${PYTHON:-python3} -m venv)"
    "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" >/dev/null 2>&1; then
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        _setup_say "installing torch 2.13.0 from $TORCH_INDEX_URL (minutes, once)"
        pip install --quiet torch==2.13.0 --index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple
    else
        _setup_say "installing torch 2.13.0 as pip is configured (minutes, once; PyPI's Linux" \
            "wheel is the CUDA build: set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" \
            "for the CPU build)"
        pip install --quiet torch==2.13.0
    fi
    _setup_say "$(python -W ignore -c 'import torch; c = torch.version.cuda
print(f"installed torch {torch.__version__}, " + (f"CUDA {c} build" if c else "CPU build"))')"
fi
stamp=.venv/.spine-node-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ] \
        || ! command -v spine-node >/dev/null; then
    _setup_say "installing spine-node and its test tools into .venv (pip install -e '.[test]'" \
        "-c constraints.txt: the versions the tests passed with)"
    pip install --quiet -e '.[test]' -c constraints.txt
    touch "$stamp"
fi
# Debian's dcmtk leaves Nagle's algorithm on; this makes storescu/echoscu/storescp send at once.
export TCP_NODELAY=1
