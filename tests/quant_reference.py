"""The reference for the quantization tests: a quantized checkpoint dequantized, layer by layer,
into a plain float32 Hugging Face model directory that transformers runs.

Written from the formats' definitions (and the tools' own loaders where a format leaves room,
as GPTQ v1 zeros), independently of loom's plugins: numpy bit fields, one format per function.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]   # nibble i of a word holds column AWQ_PACK_ORDER[i]
COPIED = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
          "generation_config.json")


def bit_fields(words: torch.Tensor, bits: int, axis: int) -> np.ndarray:
    """Split each uint32 word into its 32/bits fields, lowest bits first, laid out along
    ``axis`` (0: rows, 1: columns)."""
    w = words.numpy().view(np.uint32)
    fields = [(w >> np.uint32(bits * i)) & np.uint32((1 << bits) - 1) for i in range(32 // bits)]
    stacked = np.stack(fields, axis=axis + 1)     # [.., pf, ..] right after the packed axis
    shape = list(w.shape)
    shape[axis] *= 32 // bits
    return stacked.reshape(shape).astype(np.int64)


def gptq(t: dict, name: str, v1: bool) -> torch.Tensor:
    """W [N, K] of a GPTQ layer: qweight packed along K, qzeros along N, w = (q - z) * s."""
    scales = t[f"{name}.scales"].float().numpy()
    n = scales.shape[1]
    bits = 32 * t[f"{name}.qzeros"].shape[1] // n
    q = bit_fields(t[f"{name}.qweight"], bits, axis=0)                 # [K, N]
    qzeros = t[f"{name}.qzeros"]
    if v1:   # GPTQModel's own v1 -> v2 conversion: +1 on every field of the packed word at once
        qzeros = qzeros + sum(1 << (bits * i) for i in range(32 // bits))
    zeros = bit_fields(qzeros, bits, axis=1)                              # [G, N]
    k = q.shape[0]
    g_idx = t.get(f"{name}.g_idx")
    groups = g_idx.numpy() if g_idx is not None else np.arange(k) // (k // scales.shape[0])
    return torch.from_numpy(((q - zeros[groups]) * scales[groups]).T.copy())


def awq(t: dict, name: str) -> torch.Tensor:
    """W [N, K] of an AWQ GEMM layer: qweight [K, N/8] and qzeros packed along N in the order
    AWQ_PACK_ORDER, w = (q - z) * s."""
    scales = t[f"{name}.scales"].float().numpy()

    def unpack(words):
        fields = bit_fields(words, 4, axis=1).reshape(words.shape[0], -1, 8)
        out = np.empty_like(fields)
        out[..., AWQ_PACK_ORDER] = fields
        return out.reshape(words.shape[0], -1)

    q, zeros = unpack(t[f"{name}.qweight"]), unpack(t[f"{name}.qzeros"])
    groups = np.arange(q.shape[0]) // (q.shape[0] // scales.shape[0])
    return torch.from_numpy(((q - zeros[groups]) * scales[groups]).T.copy())


def pack_quantized(t: dict, name: str, bits: int) -> torch.Tensor:
    """W [N, K] of a compressed-tensors pack-quantized layer: offset-binary codes packed along K,
    zero points (asymmetric) packed along N, w = (q - z) * s per group of K."""
    n, k = t[f"{name}.weight_shape"].tolist()
    q = bit_fields(t[f"{name}.weight_packed"], bits, axis=1)[:, :k] - (1 << (bits - 1))
    scales = t[f"{name}.weight_scale"].float().numpy()                    # [N, G]
    zp = t.get(f"{name}.weight_zero_point")
    zeros = 0 if zp is None else bit_fields(zp, bits, axis=0)[:n] - (1 << (bits - 1))
    g_idx = t.get(f"{name}.weight_g_idx")
    groups = g_idx.numpy() if g_idx is not None else np.arange(k) // (k // scales.shape[1])
    zeros = zeros if np.isscalar(zeros) else zeros[:, groups]
    return torch.from_numpy((q - zeros) * scales[:, groups])


def scaled(t: dict, name: str, scale_name: str, block: list[int] | None) -> torch.Tensor:
    """W [N, K] of an fp8 or int8 layer: the weight times its scale, per tensor (one value),
    per channel ([N, 1]) or per ``block`` ([ceil(N/bn), ceil(K/bk)])."""
    w = t[f"{name}.weight"].float()
    s = t[f"{name}.{scale_name}"].float()
    if block:
        bn, bk = block
        s = s.repeat_interleave(bn, 0)[:w.shape[0]].repeat_interleave(bk, 1)[:, :w.shape[1]]
    elif s.numel() == 1:
        s = s.reshape(())
    else:
        s = s.reshape(-1, 1)
    return w * s


def decoder(config: dict):
    """The function dequantizing one layer of this checkpoint, and the tensor names it uses."""
    method = config["quant_method"]
    if method == "gptq":
        v1 = (config.get("checkpoint_format") or config.get("format") or "gptq") == "gptq"
        return lambda t, n: gptq(t, n, v1), "qweight"
    if method == "awq":
        return awq, "qweight"
    if method in ("auto-round", "intel/auto-round"):
        fmt = config.get("packing_format") or config.get("backend") or "auto_round:auto_gptq"
        if "awq" in fmt:
            return awq, "qweight"
        return (lambda t, n: gptq(t, n, "gptqmodel" not in fmt)), "qweight"
    if method == "fp8":
        block = config.get("weight_block_size")
        name = "weight_scale_inv" if block else "weight_scale"
        return (lambda t, n: scaled(t, n, name, block)), name
    if method == "compressed-tensors":
        (group,) = config["config_groups"].values()
        if group["format"] == "pack-quantized":
            bits = group["weights"]["num_bits"]
            return (lambda t, n: pack_quantized(t, n, bits)), "weight_packed"
        block = group["weights"].get("block_structure")
        return (lambda t, n: scaled(t, n, "weight_scale", block)), "weight_scale"
    raise ValueError(f"no reference for quant_method {method!r}")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def dequantized_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in float32, each quantized layer as its weight [N, K]."""
    config = json.loads((path / "config.json").read_text())
    decode, marker = decoder(config["quantization_config"])
    tensors = load_tensors(path)
    layers = [k[: -len(marker) - 1] for k in tensors if k.endswith(f".{marker}")]
    out = {k: v.float() for k, v in tensors.items()
           if not any(k.startswith(f"{layer}.") for layer in layers)}
    for layer in layers:
        out[f"{layer}.weight"] = decode(tensors, layer).float()
        if f"{layer}.bias" in tensors:
            out[f"{layer}.bias"] = tensors[f"{layer}.bias"].float()
    return out


def dequantize_dir(path: Path, out: Path) -> Path:
    """A float32 HF model directory with the checkpoint's weights dequantized."""
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((path / "config.json").read_text())
    config.pop("quantization_config")
    config.update(dtype="float32", torch_dtype="float32")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in dequantized_weights(path).items()},
              str(out / "model.safetensors"), {"format": "pt"})
    for name in COPIED:
        if (path / name).exists():
            shutil.copy(path / name, out / name)
    return out


# ---- activations: what a W8A8 / FP8 checkpoint says each layer's input goes through ----------
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def fp8_qdq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale


def int8_qdq(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | float) -> torch.Tensor:
    """compressed-tensors' quantize then dequantize: round(clamp(x / s + z)), (q - z) * s."""
    q = torch.round((x / scale + zero).clamp(-128, 127))
    return (q - zero) * scale


def per_token(x: torch.Tensor, qmax: float) -> torch.Tensor:
    return x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / qmax


def per_group(x: torch.Tensor, group: int):
    """x [..., K] -> ([..., K/group, group] view, its per-group fp8 scale)."""
    g = x.unflatten(-1, (-1, group))
    return g, g.abs().amax(-1, keepdim=True).clamp(min=1e-12) / FP8_MAX


def int8_dynamic(x: torch.Tensor, symmetric: bool) -> torch.Tensor:
    if symmetric:
        return int8_qdq(x, per_token(x, 127), 0.0)
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=1e-12)
    return int8_qdq(x, scale, torch.round(-128 - lo / scale))


def activation_qdq(path: Path) -> dict[str, callable]:
    """module name -> what its input becomes (quantized then dequantized), for the layers of an
    activation-quantized checkpoint."""
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    tensors = load_tensors(path)
    layers = [k[: -len(".weight")] for k, v in tensors.items()
              if k.endswith(".weight") and v.dtype in (torch.int8, FP8)]
    static = {layer: (tensors[f"{layer}.input_scale"].float(),
                      tensors.get(f"{layer}.input_zero_point", torch.zeros(())).float())
              for layer in layers if f"{layer}.input_scale" in tensors}
    if config["quant_method"] == "fp8":
        block = config.get("weight_block_size")
        kind, group = ("group", block[1]) if block else ("tensor" if static else "token", None)
        act_type, symmetric = "float", True
    else:
        (group_config,) = config["config_groups"].values()
        acts = group_config["input_activations"]
        kind, group = acts["strategy"], acts.get("group_size")
        act_type, symmetric = acts["type"], acts["symmetric"]

    def qdq(layer: str):
        if layer in static:
            scale, zero = static[layer]
            if act_type == "float":
                return lambda x: fp8_qdq(x, scale)
            return lambda x: int8_qdq(x, scale, zero)
        if act_type == "int":
            return lambda x: int8_dynamic(x, symmetric)
        if kind == "group":
            def grouped(x):
                g, scale = per_group(x, group)
                return fp8_qdq(g, scale).flatten(-2)
            return grouped
        return lambda x: fp8_qdq(x, per_token(x, FP8_MAX))

    return {layer: qdq(layer) for layer in layers}
