"""Sharded linears in one process: each rank's layer loads its part of a real checkpoint's
tensors (tests/fixtures/quant: every format and layout loom reads), and the ranks' outputs put
together (concatenated for column-parallel, summed for row-parallel) equal the whole layer's.
Also the control message that carries a step to the other ranks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from loom.distributed import messages
from loom.distributed.group import TensorParallelGroup
from loom.models.layers import (ColumnParallelLinear, Linear, QKVParallelLinear,
                                RowParallelLinear)
from loom.plugin_manager import get_plugin_manager
from loom.sampling_params import SamplingParams
from loom.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput

FIXTURES = Path(__file__).parent / "fixtures" / "quant"
NAMES = sorted(json.loads((FIXTURES / "manifest.json").read_text())["fixtures"])
# Activations quantized per token see only a rank's input columns on a row-parallel layer: its
# partial products are not the whole layer's split, just as close as the quantization allows.
PER_TOKEN_ACTIVATIONS = {"ct_w8a8_dynamic": 0.02, "ct_fp8_dynamic": 0.1}
BLOCK_FP8 = ("ct_fp8_block", "autoround_export_fp8_block")   # 128-row blocks
EXACT = 1e-5
LAYER = "model.layers.0"
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP = 128, 4, 2, 32, 256    # the fixtures' model


def checkpoint(name: str) -> dict[str, object]:
    """The fixture's tensors of layer 0, as lazy slices (the file stays open while used)."""
    f = safe_open(str(next((FIXTURES / name).glob("*.safetensors"))), framework="pt")
    return {key: f.get_slice(key) for key in f.keys() if key.startswith(LAYER + ".")}


def method_for(name: str, prefix: str):
    config = json.loads((FIXTURES / name / "config.json").read_text())["quantization_config"]
    pm = get_plugin_manager()
    method = pm.quant_method("auto", config)
    method.check_platform(pm.platform("cpu"), torch.float32)
    return method.for_layer(prefix)


def load(layer: Linear, tensors: dict, parts: list[str]) -> Linear:
    """Load checkpoint modules ``parts`` (shard i = parts[i]) as the model loader does."""
    for shard, part in enumerate(parts):
        for key, tensor in tensors.items():
            module, _, suffix = key.rpartition(".")
            if module == part:
                layer.load(suffix, tensor, shard if len(parts) > 1 else None)
    layer.quant_method.process_after_loading(layer)
    return layer


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def x(rows: int, cols: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", NAMES)
def test_row_parallel_partial_products_sum_to_the_whole(name):
    prefix = f"{LAYER}.mlp.down_proj"
    tensors, method = checkpoint(name), method_for(name, prefix)
    whole = load(Linear(MLP, [HIDDEN], False, method, torch.float32), tensors, [prefix])
    inputs = x(5, MLP)
    ref = method.apply(whole, inputs, None)
    total = 0
    for rank in range(2):
        tp = TensorParallelGroup(rank, 2)
        part = load(RowParallelLinear(MLP, HIDDEN, False, method, prefix, tp), tensors, [prefix])
        half = inputs[:, rank * MLP // 2:(rank + 1) * MLP // 2]
        total = total + method.apply(part, half, None)
    assert rel_err(total, ref) < PER_TOKEN_ACTIVATIONS.get(name, EXACT)


@pytest.mark.parametrize("name", NAMES)
def test_column_parallel_slices_concatenate_to_the_whole(name):
    prefix = f"{LAYER}.mlp.gate_up_proj"
    parts = [f"{LAYER}.mlp.gate_proj", f"{LAYER}.mlp.up_proj"]
    tensors, method = checkpoint(name), method_for(name, prefix)
    whole = load(Linear(HIDDEN, [MLP, MLP], False, method, torch.float32), tensors, parts)
    inputs = x(5, HIDDEN)
    gate, up = method.apply(whole, inputs, None).split(MLP, dim=-1)
    for rank in range(2):
        tp = TensorParallelGroup(rank, 2)
        part = load(ColumnParallelLinear(HIDDEN, [MLP, MLP], False, method, prefix, tp),
                    tensors, parts)
        rank_gate, rank_up = method.apply(part, inputs, None).split(MLP // 2, dim=-1)
        cols = slice(rank * MLP // 2, (rank + 1) * MLP // 2)
        assert rel_err(rank_gate, gate[:, cols]) < EXACT
        assert rel_err(rank_up, up[:, cols]) < EXACT


@pytest.mark.parametrize("name", NAMES)
def test_qkv_heads_split_with_kv_heads_shared(name):
    """4 ranks, 2 KV heads: ranks 0 and 1 share KV head 0, ranks 2 and 3 KV head 1."""
    prefix = f"{LAYER}.self_attn.qkv_proj"
    parts = [f"{LAYER}.self_attn.{p}_proj" for p in "qkv"]
    tensors, method = checkpoint(name), method_for(name, prefix)
    if name in BLOCK_FP8:
        with pytest.raises(ValueError, match=r"qkv_proj: cannot be sharded for rank 1 of "
                                             r"tensor-parallel-size 4.*rows \[32, 64\) of 128"):
            QKVParallelLinear(HIDDEN, HEADS, KV_HEADS, HEAD_DIM, False, method, prefix,
                              TensorParallelGroup(1, 4))
        return
    sizes = [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM]
    whole = load(Linear(HIDDEN, sizes, False, method, torch.float32), tensors, parts)
    inputs = x(5, HIDDEN)
    q, k, v = method.apply(whole, inputs, None).split(sizes, dim=-1)
    for rank in range(4):
        part = load(QKVParallelLinear(HIDDEN, HEADS, KV_HEADS, HEAD_DIM, False, method, prefix,
                                      TensorParallelGroup(rank, 4)), tensors, parts)
        rank_q, rank_k, rank_v = method.apply(part, inputs, None).split(HEAD_DIM, dim=-1)
        kv = slice(rank // 2 * HEAD_DIM, (rank // 2 + 1) * HEAD_DIM)
        assert rel_err(rank_q, q[:, rank * HEAD_DIM:(rank + 1) * HEAD_DIM]) < EXACT
        assert rel_err(rank_k, k[:, kv]) < EXACT and rel_err(rank_v, v[:, kv]) < EXACT


def test_row_parallel_ranks_add_the_bias_once():
    class Unreduced(TensorParallelGroup):       # each rank's partial result, to sum here
        def all_reduce(self, t):
            return t

    method = get_plugin_manager().quant_method("none", None)
    weight, bias, inputs = torch.randn(8, 16), torch.randn(8), x(3, 16)
    total = 0
    for rank in range(2):
        layer = RowParallelLinear(16, 8, True, method, "o", Unreduced(rank, 2))
        layer.load("weight", weight, None)
        layer.load("bias", bias, None)
        total = total + layer(inputs[:, rank * 8:(rank + 1) * 8])
    assert rel_err(total, inputs @ weight.T + bias) < EXACT


def test_a_rank_reads_only_its_slice_of_a_tensor():
    """What a row-parallel rank asks the lazy slice for: its half of the input columns."""
    asked = []

    class Lazy:
        def __init__(self, tensor):
            self.tensor = tensor

        def get_shape(self):
            return list(self.tensor.shape)

        def __getitem__(self, index):
            asked.append(index)
            return self.tensor[index]

    method = get_plugin_manager().quant_method("none", None)
    weight = torch.randn(8, 16)
    layer = RowParallelLinear(16, 8, False, method, "down", TensorParallelGroup(1, 2))
    layer.load("weight", Lazy(weight), None)
    assert asked == [(slice(None), slice(8, 16))]
    assert torch.equal(layer.weight, weight[:, 8:])


def test_a_step_crosses_as_plain_data():
    params = SamplingParams(temperature=0.7, top_k=5, stop=["\n"], stop_token_ids=[3],
                            seed=11, logprobs=2, output_kind="delta")
    sched = SchedulerOutput(
        new_requests=[NewRequestData("a", [1, 2, 300000], [], params, 11, [0, 1], 0),
                      NewRequestData("b", [5], [9, 8], SamplingParams(), None, [2], 2)],
        cached_requests=[CachedRequestData("c", [42], [7], 17)],
        num_scheduled_tokens={"a": 3, "b": 1, "c": 1}, total_num_scheduled_tokens=5,
        finished_req_ids={"d", "e"})
    assert messages.decode_step(messages.encode_step(sched)) == sched


def test_a_decode_step_of_many_requests_fits_one_broadcast():
    sched = SchedulerOutput(cached_requests=[CachedRequestData(str(i), [i], [], 100 + i)
                                             for i in range(256)],
                            num_scheduled_tokens={str(i): 1 for i in range(256)},
                            total_num_scheduled_tokens=256)
    from loom.distributed.world import HEADER
    assert len(messages.encode_step(sched)) < HEADER - 12
