"""The fused per-token FP8 activation quantization kernel against its torch twin (schemes/fp8.py
quantize_act "token"): the same codes bit for bit and the same scales, on a GPU when there is one,
else through triton's interpreter on the CPU."""
import pytest
import torch

from triton_interpreter import (DEVICE, interpreter_bf16_dot,  # noqa: F401
                                interpreter_fp8_rounding)

from loom.plugins.quant.schemes.fp8 import quantize_act  # noqa: E402
from loom.plugins.quant.triton.per_token_quant import per_token_quant_fp8  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,k", [(1, 4096), (3, 1000), (5, 2051)])
def test_matches_torch_twin(dtype, m, k):
    g = torch.Generator().manual_seed(m * k)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-3, 2, m)[:, None]).to(dtype).to(DEVICE)
    x[0, k // 3] = 300.0                      # one outlier sets the row's scale
    q, scale = per_token_quant_fp8(x, torch.float8_e4m3fn)
    ref_q, ref_scale = quantize_act(x, "token", torch.float8_e4m3fn)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (m, 1)
    assert torch.equal(scale, ref_scale.float())
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


def test_zero_rows_and_strided_input():
    x = torch.randn(4, 600, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    x[2] = 0.0
    view = x[:, 50:550]                                  # rows strided by 600
    q, scale = per_token_quant_fp8(view, torch.float8_e4m3fn)
    ref_q, ref_scale = quantize_act(view, "token", torch.float8_e4m3fn)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.equal(scale, ref_scale)
    assert scale[2].item() == pytest.approx(1e-12 / 448) and not q[2].float().any()
