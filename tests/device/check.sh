#!/usr/bin/env bash
# The accelerator check (issue 7), for a GPU machine with a PyTorch 2.x wheel
# (CUDA), the real safetensors and huggingface_hub packages, CMake and ninja,
# and no registry. One prepared call:
#
#   here:   tests/device/fetch-debs.sh
#   device: run(command="tests/device/check.sh", carry=[".device-debs"], timeout_s=540)
#
# It builds torchser against the LibTorch inside the wheel (CUDA, the
# official 2.x headers and dtypes), runs the whole test suite there (the CUDA
# tests run instead of skipping: map_location / device loads, GPU modules),
# shows the CUDA and Python interop tests' output (the real packages read
# torchser's checkpoints and write the ones torchser loads, both formats),
# measures loads onto the GPU through kDirect's pinned ring against the
# pinned host-to-device bandwidth (torchser_bench --only gpu), and runs the
# demo. The log lands in $OUT/check.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/torchser-device-check}
mkdir -p "$out"
exec > >(tee "$out/check.log") 2>&1
step() { echo; echo "=== $* ($(date +%T))"; }
status=0

step "machine"
nvidia-smi -L || true
python=$(command -v python3)
"$python" - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "cxx11 abi", torch._C._GLIBCXX_USE_CXX11_ABI)
for name in ("safetensors", "huggingface_hub"):
    try:
        print(name, __import__(name).__version__)
    except Exception as e:
        print(name, "missing:", e)
PY

step "Debian packages the image lacks (.device-debs, unpacked outside /)"
deps=/tmp/torchser-deps
multiarch=x86_64-linux-gnu
mkdir -p "$deps"
for f in .device-debs/*.deb; do dpkg -x "$f" "$deps"; done
export PATH="$PATH:$deps/usr/bin" # pkg-config, only where the image has none
export PKG_CONFIG_LIBDIR="$deps/usr/lib/$multiarch/pkgconfig:$deps/usr/share/pkgconfig"
export PKG_CONFIG_SYSROOT_DIR="$deps"
export LD_LIBRARY_PATH="$deps/usr/lib/$multiarch${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

step "configure and build against the wheel's LibTorch"
# TORCH_PREFIX: another LibTorch (an official download) instead of the wheel's.
torch_prefix=${TORCH_PREFIX:-$("$python" -c "import torch; print(torch.utils.cmake_prefix_path)")}
cmake -S . -B build-device -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$torch_prefix;$deps/usr" \
  -DGTest_DIR="$deps/usr/lib/$multiarch/cmake/GTest" \
  -DCLI11_INCLUDE_DIR="$deps/usr/include" \
  -DTORCH_CUDA_ARCH_LIST=9.0 || exit 1
cmake --build build-device -j "$(nproc)" || exit 1

step "test suite (CUDA tests run here; Python interop through $python)"
export TORCHSER_PYTHON="$python"
ctest --test-dir build-device -j 8 --output-on-failure || status=1

step "CUDA and interop tests, verbose"
build-device/tests/torchser_tests --gtest_filter='CudaTest.*:InteropTest.*:SafetensorsReaderTest.Cuda*' || status=1

step "GPU loads through kDirect's pinned ring against pinned host-to-device copies"
build-device/tests/torchser_tests --gtest_filter='DirectLoadTest.Cuda*' || status=1
build-device/tests/bench/torchser_bench --only gpu,cold --repeats 5 --no-python || status=1

step "demo"
build-device/examples/torchser_demo || status=1

step "done: status $status"
exit $status
