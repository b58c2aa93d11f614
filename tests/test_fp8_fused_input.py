"""An FP8 linear with per-token activations takes its input quantized by the op before it (the
norm, SiLU-and-mul) when its method's ``input_quant`` asks: the fused path gives the tokens and
log-probs of the unfused one. On the CPU the model's input_quant is forced on, so the torch twins
(loom.ops.FusedOps *_quant) and the QuantizedInput path of the FP8 scheme run."""
from types import SimpleNamespace

import torch

from test_quant_fixtures import FIXTURES, generate

from loom.plugins.quant.schemes.fp8 import Fp8Scheme
from loom.quant import QuantizedInput


def test_fused_quantized_input_equals_the_unfused_path(monkeypatch):
    plain = generate(FIXTURES / "ct_fp8_dynamic", fused_ops="torch")
    handed = []
    apply = Fp8Scheme.apply

    def recording_apply(self, layer, x, bias):
        handed.append(isinstance(x, QuantizedInput))
        return apply(self, layer, x, bias)

    monkeypatch.setattr(Fp8Scheme, "input_quant",
                        lambda self, layer: self.fp8_dtype if self.act == "token" else None)
    monkeypatch.setattr(Fp8Scheme, "apply", recording_apply)
    fused = generate(FIXTURES / "ct_fp8_dynamic", fused_ops="torch")
    assert [c[1] for c in fused] == [c[1] for c in plain]
    assert max(abs(a - b) for f, p in zip(fused, plain) for a, b in zip(f[2], p[2])) < 1e-5
    # qkv, gate_up (after the norms) and down (after SiLU-and-mul) got quantized inputs; o_proj,
    # after attention, plain x
    assert handed.count(True) == 3 * handed.count(False) > 0


def test_input_quant_only_for_per_token_activations_on_cuda():
    on_cpu = SimpleNamespace(w_fp8=torch.zeros(1, dtype=torch.float8_e4m3fn))
    on_gpu = SimpleNamespace(w_fp8=SimpleNamespace(is_cuda=True))
    assert Fp8Scheme("channel", "token").input_quant(on_cpu) is None
    assert Fp8Scheme("channel", "token").input_quant(on_gpu) == torch.float8_e4m3fn
    assert Fp8Scheme("online", "token").input_quant(on_gpu) == torch.float8_e4m3fn
    assert Fp8Scheme("tensor", "static").input_quant(on_gpu) is None
    assert Fp8Scheme("block", "group", (128, 128)).input_quant(on_gpu) is None
