#!/usr/bin/env bash
# Smoke test of the wheel (make test-wheel): installs the newest dist/scaletrain-*.whl into a fresh
# venv that sees the development venv's torch, then imports it outside the source tree and runs a
# few calls.   bash tools/test_wheel.sh PYTHON DIST
set -euo pipefail
PYTHON=$1
DIST=$2
WHEEL=$(ls -t "$DIST"/scaletrain-*.whl | head -n 1)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" -m venv "$WORK/venv"
SITE=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
NEW_SITE=$("$WORK/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$SITE" > "$NEW_SITE/dev-venv-torch.pth"  # torch and numpy from the development venv
"$WORK/venv/bin/python" -m pip install -q --no-deps --no-index "$WHEEL"
cd "$WORK"
"$WORK/venv/bin/python" - <<'PY'
import torch
import scaletrain
from scaletrain.amp import LossScaler
from scaletrain.attention import flash_attention

assert "site-packages" in scaletrain.__file__, scaletrain.__file__
q = torch.randn(1, 2, 16, 8, requires_grad=True)
out = flash_attention(q, q, q, causal=True)
out.sum().backward()
reference = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
assert torch.allclose(out, reference, atol=1e-5), (out - reference).abs().max()
scaler = LossScaler(init_scale=8.0)
assert scaler.scale(torch.tensor(2.0)).item() == 16.0
print(f"wheel OK: scaletrain {scaletrain.__version__} from {scaletrain.__file__}, torch {torch.__version__}")
PY
