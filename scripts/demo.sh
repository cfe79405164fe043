#!/usr/bin/env bash
# The main job on its built-in default, on a fresh machine: creates .venv-demo (CPU torch), installs the
# trainer's requirements and the demo's backbone, builds bmt_fast and runs `bmt-fast demo` (BMTPT vs SPoT
# vs prompt tuning on SmolLM2-135M-Instruct; about 15 minutes on 2 CPU cores). Outputs: outputs/demo/
# (table in results.json, demo.png, one trainer run folder per seed) and outputs/gmm_svgd.png (the 2-D
# SVGD example). Extra arguments go to `bmt-fast demo` (e.g. --quick).
source "$(dirname "$0")/_common.sh"
VENV=${BMT_FAST_DEMO_VENV:-$ROOT/.venv-demo}
make_venv "$VENV" 2.13.0 "$ROOT/requirements/train.txt" 3  # ~1.6 GB venv
install_demo_backbone "$VENV"
build_package "$VENV"
mkdir -p "$ROOT/outputs"
cd "$ROOT"
"$VENV/bin/python" -m bmt_fast.demos.gmm --out outputs/gmm_svgd.png
HF_HUB_OFFLINE=1 "$VENV/bin/bmt-fast" demo --out-dir outputs/demo "$@"
