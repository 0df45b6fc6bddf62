#!/usr/bin/env bash
# Set-up for ember on a fresh machine. `bash setup.sh` installs ember; `bash setup.sh --dev` adds what the
# test suite needs. A PyTorch that is already installed (CPU, CUDA or NPU build) is kept as it is; when
# there is none, the CPU build is installed (a bare `pip install torch` would pull several GB of CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev]"

if "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] keeping the installed PyTorch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "[setup] no PyTorch found: installing the CPU build (torch==2.13.0)"
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet --disable-pip-version-check -e ".${extras}"
# the chat page's browser tests drive Debian's Chromium through its chromedriver (tests/browser)
if [[ -n "$extras" ]] && ! { [[ -x /usr/bin/chromium ]] && [[ -x /usr/bin/chromedriver ]]; }; then
  if command -v apt-get >/dev/null; then
    SUDO=""; [[ "$(id -u)" != 0 ]] && SUDO="sudo -n"
    APT=(env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120)
    echo "[setup] installing Debian's chromium and chromium-driver (browser tests)"
    $SUDO "${APT[@]}" install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1 \
      || { $SUDO "${APT[@]}" update -qq >/dev/null && \
           $SUDO "${APT[@]}" install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; } \
      || echo "[setup] warning: could not install chromium; the browser tests will skip"
  else
    echo "[setup] warning: no apt-get: install Chromium and chromedriver at /usr/bin for the browser tests"
  fi
fi
# ember's CPU kernels are built once per machine (C compiler; without one ember runs plain PyTorch ops)
"$PY" -c "from ember.kernels import cpu_ops; print('[setup] CPU kernels:', 'ready' if cpu_ops() else 'off (no C compiler)')"
echo "[setup] ember $("$PY" -c 'import ember; print(ember.__version__)') is installed: try \`ember --help\`"
