"""On the H200: build FlashAttention-2's forward kernels from the carried source distribution
with torch.utils.cpp_extension, into the module ``flash_attn_2_cuda`` that flash_attn's Python
interface imports. Only what inference needs: head sizes 64 and 128, sm_90, forward (plain and
split-KV, causal and not, fp16 and bf16); no backward, dropout, ALiBi, softcap, local window.

    python benchmarks/attention_packages/build_flash_attn.py SRC_DIR OUT_DIR
"""
import glob
import os
import re
import shutil
import sys
import time

from torch.utils.cpp_extension import load

src, out = sys.argv[1], sys.argv[2]
csrc = os.path.join(src, "csrc", "flash_attn")
switch = os.path.join(csrc, "src", "static_switch.h")
text = open(switch).read()
# HEADDIM_SWITCH: only the 64 and 128 kernels exist in this build.
text = re.sub(r"#define HEADDIM_SWITCH\(HEADDIM, \.\.\.\).*?\}\(\)",
              "#define HEADDIM_SWITCH(HEADDIM, ...) [&] { \\\n"
              "    TORCH_CHECK(HEADDIM == 64 || HEADDIM == 128, \"this build has head sizes 64 and 128\"); \\\n"
              "    if (HEADDIM <= 64) { constexpr static int kHeadDim = 64; return __VA_ARGS__(); } \\\n"
              "    else { constexpr static int kHeadDim = 128; return __VA_ARGS__(); } \\\n"
              "  }()", text, flags=re.S)
open(switch, "w").write(text)
api = os.path.join(csrc, "flash_api.cpp")
text = open(api).read()
text = re.sub(r"void run_mha_bwd\(Flash_bwd_params &params, cudaStream_t stream\) \{.*?\n\}\n",
              "void run_mha_bwd(Flash_bwd_params &params, cudaStream_t stream) {\n"
              "    TORCH_CHECK(false, \"this flash_attn build has no backward pass\");\n}\n",
              text, flags=re.S)
open(api, "w").write(text)
sources = [api] + sorted(f for f in glob.glob(os.path.join(csrc, "src", "flash_fwd_*hdim*_sm80.cu"))
                         if re.search(r"hdim(64|128)_", f))
assert len(sources) == 17, sources
flags = ["-O3", "-std=c++17", "--use_fast_math", "--expt-relaxed-constexpr",
         "--expt-extended-lambda", "-gencode", "arch=compute_90,code=sm_90",
         "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
         "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
defines = [f"-DFLASHATTENTION_DISABLE_{x}" for x in
           ("BACKWARD", "DROPOUT", "ALIBI", "SOFTCAP", "UNEVEN_K", "LOCAL")]
os.environ.setdefault("MAX_JOBS", "16")
build = os.path.join(out, "build")
os.makedirs(build, exist_ok=True)
t0 = time.time()
load("flash_attn_2_cuda", sources, extra_cflags=["-O3", "-std=c++17"] + defines,
     extra_cuda_cflags=flags + defines,
     extra_include_paths=[csrc, os.path.join(csrc, "src"), os.path.join(src, "csrc", "cutlass", "include")],
     build_directory=build, verbose=False)
for so in glob.glob(os.path.join(build, "flash_attn_2_cuda*.so")):
    shutil.copy(so, out)
print(f"flash_attn_2_cuda built in {time.time() - t0:.0f} s", flush=True)
