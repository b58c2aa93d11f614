"""A linear whose method's ``fuses_input`` says yes takes the op before it (the norm with its
residual add, SiLU-and-mul) as a FusedInput and applies it in its own kernel (on CUDA the native
int4 GEMV, tests/test_wna16_gemv_native.py). Here, on the CPU, the int4 scheme is made to say yes,
so the model hands FusedInputs over and the scheme evaluates them with the reference ops: the
tokens and log-probs must be those of the unfused path, which holds only if every residual sum
lands where the model reads it next."""
import pytest
import torch

import triton_interpreter  # noqa: F401  (before any loom Triton module: see its docstring)
from test_quant_fixtures import FIXTURES, generate

from loom import ops
from loom.plugins.quant.native import wna16_gemv as native
from loom.plugins.quant.schemes.wna16 import WNA16Scheme
from loom.quant import FusedInput, QuantMethod


def test_fused_input_equals_the_unfused_path(monkeypatch):
    fixture = FIXTURES / "gptq_w4g32_sym_descact"
    plain = generate(fixture, fused_ops="torch")
    handed = []
    apply = WNA16Scheme.apply

    def recording_apply(self, layer, x, bias):
        handed.append(x.op if isinstance(x, FusedInput) else None)
        return apply(self, layer, x, bias)

    monkeypatch.setattr(WNA16Scheme, "fuses_input", lambda self, layer, op, x: True)
    monkeypatch.setattr(WNA16Scheme, "apply", recording_apply)
    fused = generate(fixture, fused_ops="torch")
    assert [c[1] for c in fused] == [c[1] for c in plain]
    assert max(abs(a - b) for f, p in zip(fused, plain) for a, b in zip(f[2], p[2])) < 1e-5
    # per layer: qkv and gate_up after the norms, down after SiLU-and-mul; o_proj gets plain x
    assert handed.count("rms_norm") == 2 * handed.count(None) > 0
    assert handed.count("silu_and_mul") == handed.count(None)


def test_fused_output_equals_the_unfused_path(monkeypatch):
    """A method that fuses SiLU-and-mul into its gate|up output (here: apply, then the op, the
    documented reference) gives the model's greedy tokens and logprobs of the unfused path, and
    the model hands it every layer's gate|up (with the norm as a FusedInput where fuses_input
    says so) and no activation to the down projection."""
    fixture = FIXTURES / "gptq_w4g32_sym_descact"
    plain = generate(fixture, fused_ops="torch")
    calls, handed = [], []
    apply = WNA16Scheme.apply

    def recording_apply(self, layer, x, bias):
        handed.append(x.op if isinstance(x, FusedInput) else None)
        return apply(self, layer, x, bias)

    def fused_output(self, layer, x, bias, op):
        calls.append((layer.prefix, op, x.op if isinstance(x, FusedInput) else None))
        return ops.active().silu_and_mul(apply(self, layer, x, bias))

    monkeypatch.setattr(WNA16Scheme, "fuses_input", lambda self, layer, op, x: True)
    monkeypatch.setattr(WNA16Scheme, "fuses_output",
                        lambda self, layer, op, x: op == "silu_and_mul")
    monkeypatch.setattr(WNA16Scheme, "apply", recording_apply)
    monkeypatch.setattr(WNA16Scheme, "apply_fused_output", fused_output)
    fused = generate(fixture, fused_ops="torch")
    assert [c[1] for c in fused] == [c[1] for c in plain]
    assert max(abs(a - b) for f, p in zip(fused, plain) for a, b in zip(f[2], p[2])) < 1e-5
    assert calls and all(prefix.endswith("gate_up_proj") and op == "silu_and_mul"
                         and before == "rms_norm" for prefix, op, before in calls)
    assert "silu_and_mul" not in handed


def test_quant_methods_fuse_no_output_by_default():
    method = QuantMethod()
    assert method.fuses_output(None, "silu_and_mul", torch.zeros(1, 8)) is False
    with pytest.raises(NotImplementedError, match="does not fuse 'silu_and_mul'"):
        method.apply_fused_output(None, torch.zeros(1, 8), None, "silu_and_mul")


def test_evaluate_is_the_reference_ops():
    gen = torch.Generator().manual_seed(0)
    x, residual = torch.randn(3, 64, generator=gen), torch.randn(3, 64, generator=gen)
    weight = torch.rand(64, generator=gen) + 0.5
    twin = ops.FusedOps()
    total = torch.empty_like(x)
    out = FusedInput("rms_norm", x, weight, 1e-5, residual, total).evaluate()
    want, want_total = twin.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(out, want) and torch.equal(total, want_total)
    assert torch.equal(FusedInput("rms_norm", x, weight, 1e-5).evaluate(),
                       twin.rms_norm(x, weight, 1e-5))
    gate_up = torch.randn(3, 128, generator=gen)
    assert torch.equal(FusedInput("silu_and_mul", gate_up).evaluate(),
                       twin.silu_and_mul(gate_up))


def test_bad_fused_input_is_refused():
    x = torch.zeros(1, 64)
    with pytest.raises(ValueError, match=r"op must be one of \('rms_norm', 'silu_and_mul'\)"):
        FusedInput("gelu", x)
    with pytest.raises(ValueError, match="residual and residual_out come together"):
        FusedInput("rms_norm", x, torch.ones(64), 1e-6, residual=torch.zeros(1, 64))


def test_native_gemv_checks_fused_operands():
    """Checked in Python before the extension is called (no GPU needed)."""
    k, n = 256, 64
    w_q = torch.zeros(n, k // 8, dtype=torch.int32)
    s = torch.ones(n, 2, dtype=torch.bfloat16)
    x = torch.zeros(1, k, dtype=torch.bfloat16)
    w = torch.ones(k, dtype=torch.bfloat16)
    residual = torch.zeros(1, k, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="residual_out must be a buffer of its own"):
        native.int4_gemv(FusedInput("rms_norm", x, w, 1e-6, residual, residual), w_q, s, s,
                         None, 128)
    with pytest.raises(ValueError, match=r"norm's weight must be contiguous \[256\]"):
        native.int4_gemv(FusedInput("rms_norm", x, w[:128], 1e-6), w_q, s, s, None, 128)
    with pytest.raises(ValueError, match=r"residual must be contiguous \[1, 256\]"):
        native.int4_gemv(FusedInput("rms_norm", x, w, 1e-6, residual.float(),
                                    torch.empty_like(residual)), w_q, s, s, None, 128)
    with pytest.raises(ValueError, match=r"x must have 512 columns.*silu_and_mul"):
        native.int4_gemv(FusedInput("silu_and_mul", x), w_q, s, s, None, 128)


def test_applies_to_fused_ops_by_shape(monkeypatch):
    monkeypatch.setattr(native, "_module", lambda: object())
    monkeypatch.setattr(native, "_shared_memory_limit", lambda device: 227 * 1024)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    if torch.version.hip is not None:
        pytest.skip("the native GEMV is for CUDA")
    w_q = torch.zeros(64, 32, dtype=torch.int32)
    s = torch.zeros(64, 2, dtype=torch.bfloat16)
    x, gate_up = torch.zeros(2, 256, dtype=torch.bfloat16), torch.zeros(2, 512, dtype=torch.bfloat16)
    assert native.applies(x, w_q, s, 4, 128, None, "rms_norm")
    assert native.applies(gate_up, w_q, s, 4, 128, None, "silu_and_mul")
    assert not native.applies(x, w_q, s, 4, 128, None, "silu_and_mul")
    assert not native.applies(gate_up, w_q, s, 4, 128, None, "rms_norm")
    assert not native.applies(x, w_q, s, 4, 128, None, "gelu")
    monkeypatch.setenv("LOOM_NATIVE_FUSED_INPUT", "0")
    assert not native.applies(x, w_q, s, 4, 128, None, "rms_norm")
    assert native.applies(x, w_q, s, 4, 128, None)
