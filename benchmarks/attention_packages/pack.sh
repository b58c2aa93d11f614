#!/usr/bin/env bash
# Here (with the package registry): fetch FlashInfer and FlashAttention for the H200, which
# cannot fetch anything, into the gitignored .gpu/ that device calls carry.
#   flashinfer-python 0.7.2.post1 (pure Python, JIT-compiles its kernels there) and
#   apache-tvm-ffi, unpacked and repacked as one xz tarball (18 MB instead of a 62 MB wheel);
#   the flash-attn 2.8.3.post2 source distribution, built there by build_flash_attn.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .gpu && tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$tmp" flashinfer-python==0.7.2.post1 apache-tvm-ffi==0.1.15.post2
FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE python3 -m pip download -q --no-deps --no-binary=:all: \
    --no-build-isolation -d .gpu flash-attn==2.8.3.post2
(mkdir "$tmp/site" && cd "$tmp/site" && for w in "$tmp"/*.whl; do unzip -q -o "$w"; done \
    && tar cf - . | xz -T2 -9e > "$OLDPWD/.gpu/flashinfer-site.tar.xz")
rm -rf "$tmp"
ls -la .gpu
