#!/usr/bin/env bash
# Set-up and entry point. On a fresh machine with Python 3.11 and a C++ compiler:
#   ./run.sh train [ddvae-fast train options]   the main job (DD-VAE on the synthetic data)
#   ./run.sh test  [pytest options]             lint (ruff) and the test suite (what CI runs)
#   ./run.sh bench [pytest options]             the benchmarks
#   ./run.sh gpu-check                          on a CUDA machine: every GPU measurement, one call
# The first call creates .venv and installs the package into it.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.ddvae_fast_installed"

install() {
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
    "$VENV/bin/python" -m pip install --quiet torch==2.13.0
    # The core, the application extra (the main job) and the test tools.
    # DDVAE_FAST_TEST_HOOKS=1 compiles the C++ test hooks the suite uses (csrc/common.h).
    DDVAE_FAST_TEST_HOOKS=1 "$VENV/bin/python" -m pip install --quiet -e ".[app,test]"
    # MOSES data and FCD network (application): the molsets wheel's code does not
    # import with current RDKit/pandas/NumPy, so only its data files are used.
    "$VENV/bin/python" -m pip install --quiet --no-deps molsets==0.3.1 fcd_torch==1.0.7
    touch "$STAMP"
}

# Reinstall when the build inputs changed since the last install.
if [ ! -f "$STAMP" ] || [ -n "$(find setup.py pyproject.toml csrc -newer "$STAMP" -print -quit)" ]; then
    install
fi

cmd=${1:-}
shift || true
case "$cmd" in
    train) exec "$VENV/bin/ddvae-fast" train "$@" ;;
    test)
        "$VENV/bin/ruff" check .
        "$VENV/bin/ruff" format --check .
        exec "$VENV/bin/python" -m pytest -q tests "$@" ;;
    gpu-check) exec "$VENV/bin/python" benchmarks/gpu_check.py "$@" ;;
    bench) exec "$VENV/bin/python" -m pytest -q benchmarks --benchmark-only "$@" ;;
    *) echo "usage: ./run.sh train|test|bench|gpu-check [options]" >&2; exit 2 ;;
esac
