#!/usr/bin/env bash
# Reproducible setup of the "peer" environment used by scripts/bench_peer_reap.py:
# llm-compressor (REAPPruningModifier) 0.14.x in its own virtualenv, OUTSIDE the repo,
# on the CPU build of torch (an unpinned torch would pull several GB of CUDA wheels).
#
# Idempotent: the venv is created only if missing; pip skips what is already satisfied.
#
#   bash scripts/setup_peer_venv.sh            # -> /opt/peer-venv
#   PEER_VENV=/some/dir bash scripts/setup_peer_venv.sh
set -euo pipefail

PEER_VENV="${PEER_VENV:-/opt/peer-venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
LLMCOMPRESSOR_SPEC="${LLMCOMPRESSOR_SPEC:-llmcompressor==0.14.*}"

if [ ! -x "$PEER_VENV/bin/python" ]; then
    python3 -m venv "$PEER_VENV"
fi

# Constraints file pinning torch, so llmcompressor's dependency resolution keeps the CPU wheel.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==${TORCH_VERSION}" > "$CONSTRAINTS"

"$PEER_VENV/bin/pip" install "torch==${TORCH_VERSION}"
"$PEER_VENV/bin/pip" install -c "$CONSTRAINTS" "$LLMCOMPRESSOR_SPEC"

# Record what got installed.
"$PEER_VENV/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("torch", "llmcompressor", "transformers", "compressed-tensors", "accelerate", "datasets"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
PY
