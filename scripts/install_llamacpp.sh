#!/usr/bin/env bash
# Install llama-cpp-python (llama.cpp's loader and quantizer, used to verify and K-quantize GGUF exports)
# into the Python given as $PYTHON (default: the `python` on PATH). Compiling llama.cpp takes minutes on a
# small machine, so the wheel is built once into a cache folder and reused by every later install.
set -euo pipefail

PYTHON="${PYTHON:-python}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${QDORA_WHEEL_CACHE:-$HOME/.cache/qdora-wheels}"
mkdir -p "$CACHE"

if "$PYTHON" -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.__version__ == '$VERSION' else 1)" 2>/dev/null; then
    echo "llama-cpp-python $VERSION already installed"
    exit 0
fi

wheel="$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n1 || true)"
if [ -z "$wheel" ]; then
    echo "building llama-cpp-python $VERSION wheel into $CACHE (several minutes)"
    start=$(date +%s)
    # Portable CPU build (no -march=native: the cached wheel may run on another CPU of the same image);
    # no examples, tests, server or multimodal tools, which qdora does not use.
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF}" \
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
        "$PYTHON" -m pip wheel --no-deps --wheel-dir "$CACHE" "llama-cpp-python==$VERSION"
    echo "built in $(( $(date +%s) - start )) s"
    wheel="$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl | head -n1)"
fi

"$PYTHON" -m pip install "$wheel"
"$PYTHON" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
