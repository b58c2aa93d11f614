"""The Triton GEMV (loom.plugins.quant.triton.gemv) against an fp32 matmul, and the unquantized
method's use of it: on a GPU when there is one, else through triton's interpreter on the CPU
(TRITON_INTERPRET=1, set before the kernels are defined)."""
import pytest
import torch

from triton_interpreter import DEVICE, interpreter_bf16_dot, tl, triton  # noqa: F401

from loom.models.layers import Linear  # noqa: E402
from loom.plugins.quant.triton import gemv as gemv_module  # noqa: E402
from loom.plugins.quant.triton.gemv import GemvConfig, gemv, gemv_supported  # noqa: E402
from loom.plugins.quant.unquantized import Unquantized  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def randn(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)


def check(x, w, bias, out):
    ref = x.float() @ w.float().T + (0 if bias is None else bias.float())
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert ((out.float() - ref).norm() / ref.norm()).item() < TOLERANCE[x.dtype]


@pytest.mark.parametrize("m", [*range(1, 9), 16])
def test_rows(m):
    x, w = randn(m, 257, dtype=torch.bfloat16), randn(100, 257, dtype=torch.bfloat16, seed=1)
    check(x, w, None, gemv(x, w))


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("m,n,k", [(1, 100, 257), (3, 257, 100), (8, 33, 1100)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_shapes_dtypes_bias(dtype, m, n, k, with_bias):
    x, w = randn(m, k, dtype=dtype), randn(n, k, dtype=dtype, seed=1)
    bias = randn(n, dtype=dtype, seed=2) if with_bias else None
    check(x, w, bias, gemv(x, w, bias))


@pytest.mark.parametrize("config", [GemvConfig(16, 128, 4, 6), GemvConfig(32, 256, 4, 3),
                                    GemvConfig(64, 64, 8, 2)])
def test_configs(config):
    x, w = randn(2, 300, dtype=torch.bfloat16), randn(70, 300, dtype=torch.bfloat16, seed=1)
    check(x, w, None, gemv(x, w, config=config))


def test_strided_rows_of_x():
    big = randn(3, 400, dtype=torch.float32)
    x, w = big[:, :257], randn(100, 257, seed=1)
    check(x, w, None, gemv(x, w))


def test_supported():
    w = randn(16, 32, dtype=torch.bfloat16)
    assert gemv_supported(randn(8, 32, dtype=torch.bfloat16), w)
    assert not gemv_supported(randn(9, 32, dtype=torch.bfloat16), w)         # too many rows
    assert not gemv_supported(randn(0, 32, dtype=torch.bfloat16), w)
    assert not gemv_supported(randn(1, 32), w)                                # dtype mismatch
    assert not gemv_supported(randn(1, 64, dtype=torch.bfloat16)[:, ::2], w)  # strided K
    assert not gemv_supported(randn(2, 1, 32, dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match="at most 16 rows"):
        gemv(randn(17, 32, dtype=torch.bfloat16), w)


def linear_layer_with_recorded_gemv(monkeypatch, calls: list[int]) -> Linear:
    def recording_gemv(x, *args):
        calls.append(x.shape[0])
        return gemv(x, *args)

    monkeypatch.setattr(gemv_module, "gemv", recording_gemv)
    layer = Linear(96, [40, 24], True, Unquantized(), torch.bfloat16).to(DEVICE)
    layer.weight.copy_(randn(64, 96, dtype=torch.bfloat16))
    layer.bias.copy_(randn(64, dtype=torch.bfloat16, seed=1))
    return layer


@pytest.mark.parametrize("m", [1, 5, 12])
def test_unquantized_apply(monkeypatch, m):
    """Linear layers take the GEMV for up to MAX_M rows and F.linear beyond."""
    if DEVICE == "cpu":
        monkeypatch.setattr(Unquantized, "gemv_on_cpu", True)
    calls = []
    layer = linear_layer_with_recorded_gemv(monkeypatch, calls)
    x = randn(m, 96, dtype=torch.bfloat16, seed=2)
    check(x, layer.weight, layer.bias, layer(x))
    assert calls == ([m] if m <= gemv_module.MAX_M else [])


def test_unquantized_apply_keeps_f_linear_on_cpu(monkeypatch):
    if DEVICE != "cpu":
        pytest.skip("the CPU default")
    calls = []
    layer = linear_layer_with_recorded_gemv(monkeypatch, calls)
    x = randn(1, 96, dtype=torch.bfloat16, seed=2)
    check(x, layer.weight, layer.bias, layer(x))
    assert calls == []
