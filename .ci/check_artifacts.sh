#!/usr/bin/env bash
# Build the sdist and the wheel (the wheel from the sdist), check them with twine, install the wheel into a clean
# virtual environment and run the README's quick start there, from outside the checkout.
# Needs `python` with build and twine (CI: the pinned .venv of .ci/run). Usage: bash .ci/check_artifacts.sh
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Build from a copy of the tracked files, so that nothing untracked (local runs, build leftovers) reaches the sdist.
mkdir "$work/src"
git ls-files -z | xargs -0 cp --parents -t "$work/src"
python -m build --outdir "$work/dist" "$work/src"
python -m twine check --strict "$work"/dist/*
echo "sdist:"; tar tzf "$work"/dist/hybridzo-*.tar.gz
if tar tzf "$work"/dist/hybridzo-*.tar.gz | grep -E '^hybridzo-[^/]+/(tests|examples|benchmarks|docs)/'; then
    echo "the sdist holds files from outside the package (see MANIFEST.in)" >&2
    exit 1
fi

python3 -m venv "$work/venv"
# torch 2.13.0 is the CPU-only build on this machine's disk (pyproject allows torch>=2.1): quicker than 2.14.1.
"$work/venv/bin/pip" install -q torch==2.13.0
"$work/venv/bin/pip" install -q "$work"/dist/hybridzo-*.whl
{
    python3 "$repo/tests/readme_blocks.py" "Quick start" python --with-loader
    printf 'import hybridzo, sys\nassert hybridzo.__file__.startswith(sys.prefix), hybridzo.__file__\n'
    printf 'print("quick start from the wheel: hybridzo", hybridzo.__version__, "from", hybridzo.__file__, "loss", float(loss))\n'
} > "$work/quick_start.py"
(cd "$work" && "$work/venv/bin/python" quick_start.py)
