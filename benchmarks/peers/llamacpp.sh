#!/usr/bin/env bash
# llama.cpp as a benchmark peer (see /work/shared/BENCH.md, "Peers").
#
# Builds llama.cpp once, from the llama-cpp-python source distribution, into an ignored
# cache folder; the project never vendors llama.cpp code.
#
#   llamacpp.sh build                                  build the tools + converter venv
#   llamacpp.sh convert MODEL_DIR OUT.gguf [bf16|f16|q8_0]
#   llamacpp.sh quantize IN.gguf OUT.gguf q4_0|q8_0|q4_k|q6_k
#   llamacpp.sh bench GGUF [threads]                   llama-bench pp512 / tg128, JSON on stdout
#   llamacpp.sh server GGUF PORT [parallel] [llama-server args...]
#
# Environment: LLAMACPP_CACHE (default <repo>/.peers/llamacpp), LLAMACPP_PY_VERSION
# (llama-cpp-python sdist version, default below), LLAMACPP_JOBS (default 2),
# LLAMACPP_REBUILD=1 (re-run cmake + ninja on an existing build),
# LLAMACPP_THREADS (default 2), LLAMACPP_BENCH_PP / _TG / _REPS (default 512 / 128 / 5),
# LLAMACPP_BENCH_DEPTH (tokens already in the context when -p/-n are timed; default 0),
# LLAMACPP_PRE (pre-tokenizer name forced on an unknown tokenizer; default by model_type).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${LLAMACPP_CACHE:-$REPO_ROOT/.peers/llamacpp}"
PY_VERSION="${LLAMACPP_PY_VERSION:-0.3.36}"
JOBS="${LLAMACPP_JOBS:-2}"
THREADS="${LLAMACPP_THREADS:-2}"
CTX_PER_SLOT=4096            # matches vLLM's --max-model-len in vllm.sh
SRC="$CACHE/src"             # the vendored llama.cpp tree, extracted from the sdist
BUILD="$CACHE/build"
BIN="$BUILD/bin"
VENV="$CACHE/venv"           # python for convert_hf_to_gguf.py
CONVERTER="$CACHE/convert_hf_to_gguf_local.py"
TARGETS=(llama-bench llama-batched-bench llama-server llama-quantize)
# The native build's AMX path crashes on quantized types on the AMX VMs (upstream #20824).
NO_AMX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"

die() { echo "llamacpp.sh: $*" >&2; exit 1; }
log() { echo "[llamacpp] $*" >&2; }

# pip, minus the warnings about the machine's file:// extra indexes lacking a package.
pip_quiet() {
    "$@" 2>&1 | { grep -v "is neither a file nor a directory" || true; } >&2
    return "${PIPESTATUS[0]}"
}

fetch_source() {
    [[ -f "$SRC/CMakeLists.txt" ]] && return
    mkdir -p "$CACHE/sdist"
    log "downloading llama-cpp-python==$PY_VERSION sdist"
    pip_quiet python3 -m pip download --no-binary :all: --no-deps --dest "$CACHE/sdist" \
        "llama-cpp-python==$PY_VERSION"
    local tarball="$CACHE/sdist/llama_cpp_python-$PY_VERSION.tar.gz"
    local tmp="$CACHE/sdist/extract"
    rm -rf "$tmp" && mkdir -p "$tmp"
    tar -xzf "$tarball" -C "$tmp"
    # The sdist keeps the submodule's git dir; its HEAD is the llama.cpp commit.
    cp "$tmp/llama_cpp_python-$PY_VERSION/.git/modules/vendor/llama.cpp/HEAD" \
        "$CACHE/LLAMA_CPP_COMMIT" 2>/dev/null || echo unknown >"$CACHE/LLAMA_CPP_COMMIT"
    rm -rf "$SRC"
    mv "$tmp/llama_cpp_python-$PY_VERSION/vendor/llama.cpp" "$SRC"
    rm -rf "$tmp"
}

build_tools() {
    if all_tools_built && [[ -z "${LLAMACPP_REBUILD:-}" ]]; then
        log "tools already built in $BIN (LLAMACPP_REBUILD=1 re-runs cmake)"
        return
    fi
    local start=$SECONDS commit
    commit="$(head -c 8 "$CACHE/LLAMA_CPP_COMMIT" 2>/dev/null || echo unknown)"
    cmake -S "$SRC" -B "$BUILD" -G Ninja \
        -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON \
        -DCMAKE_C_FLAGS="$NO_AMX_FLAGS" \
        -DCMAKE_CXX_FLAGS="$NO_AMX_FLAGS" \
        -DLLAMA_USE_PREBUILT_UI=OFF \
        -DLLAMA_BUILD_COMMIT="$commit" \
        -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF \
        -DBUILD_SHARED_LIBS=OFF >&2
    cmake --build "$BUILD" --config Release -j "$JOBS" --target "${TARGETS[@]}" >&2
    echo "llama-cpp-python $PY_VERSION; llama.cpp $commit; build seconds $((SECONDS - start));" \
        "flags: native $NO_AMX_FLAGS; $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)" \
        >>"$CACHE/BUILD_INFO"
    log "built in $((SECONDS - start)) s"
}

all_tools_built() {
    local tool
    for tool in "${TARGETS[@]}"; do [[ -x "$BIN/$tool" ]] || return 1; done
}

setup_converter_venv() {
    if [[ -x "$VENV/bin/python" ]] &&
        "$VENV/bin/python" -c "import gguf, torch, transformers" 2>/dev/null; then
        return
    fi
    log "creating converter venv in $VENV"
    python3 -m venv "$VENV"
    # CPU torch only; the converter's own pins (transformers 4.57.x) read our config.json
    # and tokenizer files as the published checkpoints are read.
    pip_quiet "$VENV/bin/pip" install -q "torch==2.13.0"
    pip_quiet "$VENV/bin/pip" install -q "transformers==4.57.6" "numpy>=2.2" \
        "sentencepiece>=0.1.98,<0.3.0" "protobuf>=4.21,<5" "$SRC/gguf-py"
}

# The converter refuses a tokenizer whose pre-tokenizer hash it does not know (our
# locally trained one). This launcher, kept in the cache, runs the unmodified converter
# with get_vocab_base_pre overridden: on an unknown hash it returns a known name.
write_converter_launcher() {
    cat >"$CONVERTER" <<EOF
# Generated by benchmarks/peers/llamacpp.sh; runs $SRC/convert_hf_to_gguf.py.
import json, os, runpy, sys
from pathlib import Path

SRC = Path("$SRC")
sys.path.insert(0, str(SRC))
sys.path.insert(1, str(SRC / "gguf-py"))
from conversion.base import TextModel  # noqa: E402

PRE_BY_MODEL_TYPE = {"qwen2": "qwen2", "llama": "llama-bpe"}
_known_pre = TextModel.get_vocab_base_pre


def _pre_or_fallback(self, tokenizer):
    try:
        return _known_pre(self, tokenizer)
    except NotImplementedError:
        model_type = self.hparams.get("model_type", "")
        pre = os.environ.get("LLAMACPP_PRE") or PRE_BY_MODEL_TYPE.get(model_type)
        if pre is None:
            raise
        print(f"[llamacpp] unknown pre-tokenizer hash: using {pre!r}", file=sys.stderr)
        return pre


TextModel.get_vocab_base_pre = _pre_or_fallback
sys.argv[0] = str(SRC / "convert_hf_to_gguf.py")
runpy.run_path(sys.argv[0], run_name="__main__")
EOF
}

cmd_build() {
    command -v cmake >/dev/null || die "cmake not found"
    fetch_source
    build_tools
    setup_converter_venv
    write_converter_launcher
    log "ready: $BIN ($(tail -n 1 "$CACHE/BUILD_INFO" 2>/dev/null || true))"
}

require_built() {
    all_tools_built || die "llama.cpp is not built; run: $0 build"
}

cmd_convert() {
    [[ $# -ge 2 ]] || die "usage: convert MODEL_DIR OUT.gguf [bf16|f16|q8_0]"
    local model_dir="$1" out="$2" outtype="${3:-bf16}"
    case "$outtype" in bf16|f16|q8_0) ;; *) die "convert type must be bf16, f16 or q8_0" ;; esac
    [[ -f "$model_dir/config.json" ]] || die "$model_dir has no config.json"
    [[ -x "$VENV/bin/python" ]] || die "converter venv missing; run: $0 build"
    write_converter_launcher
    mkdir -p "$(dirname "$out")"
    "$VENV/bin/python" "$CONVERTER" "$model_dir" --outfile "$out" --outtype "$outtype"
}

cmd_quantize() {
    [[ $# -eq 3 ]] || die "usage: quantize IN.gguf OUT.gguf q4_0|q8_0|q4_k|q6_k"
    require_built
    local type
    case "$3" in
        q4_0) type=Q4_0 ;; q8_0) type=Q8_0 ;; q4_k) type=Q4_K_M ;; q6_k) type=Q6_K ;;
        *) die "quantize type must be q4_0, q8_0, q4_k or q6_k" ;;
    esac
    "$BIN/llama-quantize" "$1" "$2" "$type" "$THREADS"
}

cmd_bench() {
    [[ $# -ge 1 ]] || die "usage: bench GGUF [threads]"
    require_built
    local gguf="$1" threads="${2:-$THREADS}"
    # llama-bench appends repeated -p/-n values, so lengths come from the environment.
    "$BIN/llama-bench" -m "$gguf" -t "$threads" -o json \
        -p "${LLAMACPP_BENCH_PP:-512}" -n "${LLAMACPP_BENCH_TG:-128}" -r "${LLAMACPP_BENCH_REPS:-5}" \
        -d "${LLAMACPP_BENCH_DEPTH:-0}"
}

cmd_server() {
    [[ $# -ge 2 ]] || die "usage: server GGUF PORT [parallel] [llama-server args...]"
    require_built
    local gguf="$1" port="$2" parallel="${3:-1}"
    shift $(( $# >= 3 ? 3 : 2 ))
    exec "$BIN/llama-server" -m "$gguf" --host 127.0.0.1 --port "$port" \
        --parallel "$parallel" -t "$THREADS" -c $((CTX_PER_SLOT * parallel)) "$@"
}

main() {
    local sub="${1:-}"
    [[ -n "$sub" ]] || die "usage: $0 build|convert|quantize|bench|server ..."
    shift
    case "$sub" in
        build) cmd_build ;;
        convert) cmd_convert "$@" ;;
        quantize) cmd_quantize "$@" ;;
        bench) cmd_bench "$@" ;;
        server) cmd_server "$@" ;;
        *) die "unknown subcommand: $sub" ;;
    esac
}

main "$@"
