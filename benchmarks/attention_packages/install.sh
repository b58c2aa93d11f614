# On the H200 (source it): put FlashInfer and FlashAttention on PYTHONPATH from the carried .gpu/.
# FlashAttention: the extension built earlier (.gpu/flash_attn_2_cuda*.so) or a fresh build;
# FlashInfer: its JIT cache (.gpu/flashinfer-jit.tar.xz) restored, so nothing recompiles.
site=/tmp/attn-site
mkdir -p $site
python3 -c "import tarfile; tarfile.open('.gpu/flashinfer-site.tar.xz').extractall('$site')"
tar xzf .gpu/flash_attn-2.8.3.post2.tar.gz -C /tmp
cp -r /tmp/flash_attn-2.8.3.post2/flash_attn $site/
export FLASHINFER_WORKSPACE_BASE=/tmp/fi-base
mkdir -p $FLASHINFER_WORKSPACE_BASE
[ -f .gpu/flashinfer-jit.tar.xz ] && python3 -c "import tarfile; tarfile.open('.gpu/flashinfer-jit.tar.xz').extractall('$FLASHINFER_WORKSPACE_BASE')"
if ls .gpu/flash_attn_2_cuda*.so >/dev/null 2>&1; then
    cp .gpu/flash_attn_2_cuda*.so $site/
fi
export PYTHONPATH=$site:${PYTHONPATH:-}
