#!/usr/bin/env bash
# Build llama.cpp's own C++ `llama-server` from the llama.cpp sources vendored in the
# installed llama-cpp-python's sdist, so benchmarks/side_by_side.py --llama-server can
# compare InferFlux with llama.cpp's server built from the SAME sources (and the same ISA)
# as the llama-cpp-python the test extra installs (issue 15).
#
#   benchmarks/build_llama_server.sh [DIR]      # DIR defaults to /tmp/llama-build
#
# Idempotent: the sdist is fetched (pip download) and unpacked only when missing, and
# ninja rebuilds only what changed. The last line printed is the binary's path
# (DIR/bin/llama-server). Environment:
#   LCP_SDIST=FILE   use this llama_cpp_python-<version>.tar.gz instead of downloading it
#   JOBS=N           ninja -j (default 1: the build shares the machine; ~15-30 min on -j1)
#   NICE=N           nice level for the build (default 19)
#   ISA_ARGS="..."   the CPU-ISA cmake flags. The default matches what `CMAKE_ARGS=-DGGML_NATIVE=OFF
#                    pip install llama-cpp-python` (.ci/run) builds: ggml's non-native default set,
#                    AVX AVX2 FMA F16C BMI2 and no AVX-512 (llama_cpp's llama_print_system_info()
#                    says the same). A -march=native build crashed with SIGILL on the shared hosts.
#                    InferFlux's CPU kernels pick AVX-512 VNNI at run time where the CPU has it, so
#                    for a like-for-like comparison on such a machine build llama.cpp with it too
#                    (benchmarks/RESULTS.md's side-by-side did):
#                    ISA_ARGS="-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
#                      -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=ON
#                      -DGGML_AVX_VNNI=ON"
#   EXTRA_CMAKE_ARGS="..."  appended to the cmake configure line
set -euo pipefail

DIR=$(mkdir -p "${1:-/tmp/llama-build}" && cd "${1:-/tmp/llama-build}" && pwd)
JOBS=${JOBS:-1}
NICE=${NICE:-19}
ISA_ARGS=${ISA_ARGS:-"-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
-DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF"}
PY=${PYTHON:-python}

VERSION=$("$PY" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))')
SRC="$DIR/src/llama_cpp_python-$VERSION"
SDIST=${LCP_SDIST:-"$DIR/src/llama_cpp_python-$VERSION.tar.gz"}
mkdir -p "$DIR/src"

if [ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]; then
  if [ ! -f "$SDIST" ]; then
    echo "downloading the llama-cpp-python $VERSION sdist" >&2
    "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DIR/src"
    SDIST="$DIR/src/llama_cpp_python-$VERSION.tar.gz"
  fi
  tar xzf "$SDIST" -C "$DIR/src"
fi

# Configure (re-running cmake on an existing build dir is cheap and picks up flag changes).
# shellcheck disable=SC2086  # ISA_ARGS / EXTRA_CMAKE_ARGS are word lists on purpose
cmake -S "$SRC/vendor/llama.cpp" -B "$DIR/build" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=OFF $ISA_ARGS \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  ${EXTRA_CMAKE_ARGS:-} >&2

nice -n "$NICE" ninja -C "$DIR/build" -j "$JOBS" llama-server >&2

ln -sfn build/bin "$DIR/bin"
"$DIR/bin/llama-server" --version >&2 || true
echo "$DIR/bin/llama-server"
