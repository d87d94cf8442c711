# Sourced by .ci/cuda-build and .ci/torch-2.11: exports CUDA_HOME, the CUDA toolkit
# (default: the one holding nvcc; a wrapper outside the toolkit, as /usr/local/bin/nvcc,
# falls back to /usr/local/cuda), and prints its release.
if [ -z "${CUDA_HOME:-}" ]; then
  nvcc=$(command -v nvcc) || { echo "nvcc not found: install the CUDA toolkit or set CUDA_HOME" >&2; exit 1; }
  CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
  if [ ! -f "$CUDA_HOME/include/cuda_runtime.h" ] && [ -f /usr/local/cuda/include/cuda_runtime.h ]; then
    CUDA_HOME=/usr/local/cuda
  fi
fi
export CUDA_HOME
echo "CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | grep release))"
