# Sourced by scripts/demo and scripts/test: make .venv (Python 3.11+) and install a pinned
# requirements file into it, skipping pip when the file has not changed since the last install.
# Usage: ensure_venv requirements.txt

find_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "error: Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)" >&2
  return 1
}

ensure_venv() {
  local requirements="$1" python stamp digest
  if [ ! -x .venv/bin/python ]; then
    python="$(find_python)"
    echo "Creating .venv with $("$python" --version)..."
    "$python" -m venv .venv
  fi
  # The digest covers both files (requirements-dev.txt includes requirements.txt) and the client's
  # pyproject.toml (its pins and console script), so a change there reinstalls it.
  digest="$(cat "$requirements" requirements.txt client/pyproject.toml | .venv/bin/python -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
  stamp=".venv/.installed-$(basename "$requirements").sha256"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
    echo "Installing $requirements into .venv..."
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$requirements"
    # The provider agent, editable, so `gpgpu-agent` is on .venv's PATH (its deps are pinned above).
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e ./agent
    # The renter's client, editable, so `gpgpu` is on .venv's PATH (its deps are pinned above too).
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e ./client
    echo "$digest" >"$stamp"
  fi
}

# Install node_modules (the contract compiler and the anvil node the chain tests and the demo
# use) with `npm ci`, skipping npm when package-lock.json has not changed since the last install.
# Without npm, warn and go on: the anvil tests then skip (or fail under CI) and the demo runs
# without a chain.
ensure_node_modules() {
  local digest stamp=node_modules/.installed-package-lock.sha256
  if ! command -v npm >/dev/null 2>&1; then
    echo "warning: npm not found; install Node.js 20+ for the local chain (anvil)" >&2
    return 0
  fi
  digest="$(.venv/bin/python -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' package-lock.json)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
    echo "Installing node_modules (npm ci)..."
    npm ci --no-audit --no-fund --loglevel=error
    echo "$digest" >"$stamp"
  fi
}
