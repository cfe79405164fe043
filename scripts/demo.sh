#!/usr/bin/env bash
# The main job on its built-in default, on a fresh machine: creates .venv-demo (CPU torch), builds
# bmt_fast and runs the demo. Extra arguments go to the demo.
source "$(dirname "$0")/_common.sh"
VENV=${BMT_FAST_DEMO_VENV:-$ROOT/.venv-demo}
make_venv "$VENV" 2.13.0 "$ROOT/requirements/demo.txt"
build_package "$VENV"
mkdir -p "$ROOT/outputs"
cd "$ROOT"
"$VENV/bin/python" -m bmt_fast.demos.gmm --out outputs/gmm_svgd.png "$@"
