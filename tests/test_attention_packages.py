"""The flashinfer and flash_attn plugins on a machine without their packages (CI): each is
registered as a placeholder that says what is missing, and naming it fails with that message;
and FlashInfer's page-table form of loom's block tables (host code, no kernel)."""
import pytest
import torch

from loom.engine import Engine
from loom.config import load_config
from loom.plugin_manager import PluginError, get_plugin_manager
from loom.plugins.attention import flash_attn as flash_attn_plugin
from loom.plugins.attention import flashinfer as flashinfer_plugin
from loom.plugins.attention.flashinfer import paged_kv

PACKAGES = {"flashinfer": flashinfer_plugin.flashinfer,
            "flash_attn": flash_attn_plugin.flash_attn_varlen_func}


@pytest.mark.parametrize("name", list(PACKAGES))
def test_missing_package_is_named_with_how_to_install(name, tiny_models, tmp_path):
    if PACKAGES[name] is not None:
        pytest.skip(f"{name} is installed here")
    cls = get_plugin_manager().get("attention_backend", name)
    assert "does not import" in cls.unavailable and "pip install" in cls.unavailable
    pm = get_plugin_manager()
    assert name not in pm._supported("attention_backend", pm.platform()).split(", ")
    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"model: {tiny_models['llama']}\nattention-backend: {name}\n")
    with pytest.raises(PluginError, match=f"attention backend '{name}' cannot be used: .*pip install"):
        Engine(load_config(str(yaml)))


def test_auto_skips_unavailable_backends(tiny_models):
    engine = Engine(load_config(None, {"model": str(tiny_models["llama"])}))
    assert engine.executor.runner.attn.name == "torch"


def test_paged_kv_matches_block_tables():
    block_tables = torch.tensor([[7, 3, 9, 0], [2, 5, 0, 0], [4, 0, 0, 0]], dtype=torch.int32)
    kv = paged_kv(torch.tensor([33, 17, 16]), block_tables, 16)
    assert kv.indptr.tolist() == [0, 3, 5, 6]
    assert kv.indices.tolist() == [7, 3, 9, 2, 5, 4]
    assert kv.last_page_len.tolist() == [1, 1, 16]


def test_paged_kv_pads_empty_sequences_with_one_finite_slot():
    """Graph padding rows (seq_len 0, stale block tables) read block 0's first slot."""
    block_tables = torch.tensor([[6, 1], [8, 8], [9, 9]], dtype=torch.int32)
    kv = paged_kv(torch.tensor([20, 0, 0]), block_tables, 16, pad_empty=True)
    assert kv.indptr.tolist() == [0, 2, 3, 4]
    assert kv.indices.tolist() == [6, 1, 0, 0]
    assert kv.last_page_len.tolist() == [4, 1, 1]
    assert block_tables[1].tolist() == [8, 8], "the caller's table is left as it was"


def test_fused_kv_writer_turns_graphs_off_for_a_syncing_write():
    from loom import ops
    from loom.attention import AttentionBackend, fused_kv_writer
    from loom.ops import FusedOps

    class Backend(AttentionBackend):
        name, supports_graphs = "b", True

    class GraphSafe(FusedOps):
        graph_safe_write_kv = True

    before = ops.active()
    try:
        for fused, graphs in ((FusedOps(), False), (GraphSafe(), True)):
            ops.use(fused)
            backend = Backend(4, 2, 8, 1.0, torch.float32, torch.device("cpu"))
            assert fused_kv_writer(backend) == fused.write_kv
            assert backend.supports_graphs is graphs and Backend.supports_graphs is True
    finally:
        ops.use(before)
