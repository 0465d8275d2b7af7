#!/usr/bin/env bash
# Sets up everything scaletrain needs on Debian 12 (bookworm), starting from git and make:
#   1. the Debian packages of the build (compiler, cmake, ninja, ccache, Python, -dev libraries),
#      installed with apt-get when missing (as root, or through sudo);
#   2. the virtual environment .venv with torch==2.11.0 and the Python test tools from PyPI;
#   3. a .pth file so that `import scaletrain` in .venv finds python/ of this checkout.
# Idempotent: with nothing to do it finishes in about a second. Environment: VENV (default
# .venv), PYTHON (interpreter for a new venv; default /usr/bin/python3), SCALETRAIN_NO_APT=1 to
# skip the apt step (packages installed by other means).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
REQUIREMENTS=$ROOT/tools/requirements.txt
STEP="starting"
HINT=""
trap 'status=$?; echo "bootstrap: FAILED while ${STEP} (exit ${status}).${HINT:+ $HINT}" >&2; exit $status' ERR
say() { echo "bootstrap: $*"; }

APT_PACKAGES=(
  g++ make cmake ninja-build ccache git pkg-config
  python3 python3-venv python3-dev
  libfmt-dev libspdlog-dev libyaml-cpp-dev libcli11-dev nlohmann-json3-dev zlib1g-dev libgloo-dev
  libgtest-dev libgmock-dev libbenchmark-dev
)

# --- 1. Debian packages -------------------------------------------------------------------
STEP="checking Debian packages"
if [ "${SCALETRAIN_NO_APT:-0}" != 1 ]; then
  if ! command -v dpkg-query >/dev/null; then
    say "no dpkg: not Debian; install the equivalents of: ${APT_PACKAGES[*]} (then SCALETRAIN_NO_APT=1)"
  else
    missing=()
    for package in "${APT_PACKAGES[@]}"; do
      dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
    done
    if [ ${#missing[@]} -gt 0 ]; then
      STEP="installing Debian packages (${missing[*]})"
      HINT="Run as root or with sudo and a reachable Debian mirror, or install them yourself: apt-get install ${missing[*]}"
      SUDO=()
      if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || { echo "bootstrap: need root to install: ${missing[*]}. $HINT" >&2; exit 1; }
        SUDO=(sudo)
      fi
      say "installing ${missing[*]}"
      "${SUDO[@]}" apt-get update -qq
      DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
  fi
fi

# --- 2. Python virtual environment ---------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  STEP="creating the virtual environment $VENV"
  HINT="Check that python3-venv is installed (apt-get install python3-venv) or set PYTHON=/path/to/python3."
  python=${PYTHON:-}
  if [ -z "$python" ]; then
    if [ -x /usr/bin/python3 ]; then python=/usr/bin/python3; else python=$(command -v python3); fi
  fi
  say "creating $VENV with $python"
  "$python" -m venv "$VENV"
fi

STEP="checking Python packages"
wanted=$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)
stamp=$VENV/.scaletrain-requirements
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  STEP="installing Python packages from PyPI (tools/requirements.txt)"
  HINT="Check access to pypi.org and about 6 GB of free disk; then run make bootstrap again."
  say "installing Python packages (torch==2.11.0 is about 4.7 GB; takes a few minutes)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQUIREMENTS"
  STEP="checking the installed torch"
  HINT="Remove $VENV and run make bootstrap again."
  "$VENV/bin/python" - <<'PY'
import torch
assert torch.__version__.split("+")[0] == "2.11.0", f"torch {torch.__version__} installed, expected 2.11.0"
PY
  echo "$wanted" > "$stamp"
fi

# A CUDA toolkit of another major version than torch's would put two CUDA runtimes in one
# process: say so (CMake then builds without CUDA kernels).
if command -v nvcc >/dev/null; then
  nvcc_major=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
  torch_cuda=$("$VENV/bin/python" -c "import torch; print(torch.version.cuda or '')" 2>/dev/null || true)
  if [ -n "$torch_cuda" ] && [ "${torch_cuda%%.*}" != "$nvcc_major" ]; then
    say "warning: nvcc is CUDA $nvcc_major but torch uses CUDA $torch_cuda; CUDA kernels will not be built"
  fi
fi

# --- 3. Make the source package importable -------------------------------------------------
STEP="linking python/ into $VENV"
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$ROOT/python" > "$site/scaletrain-source.pth"
say "ready ($VENV)"
