"""loom.testing: the conformance kit, a pytest plugin a plugin author runs against their own code.

    pytest --pyargs loom.testing --loom-attention NAME    # against torch_ref
    pytest --pyargs loom.testing --loom-quant NAME        # against dequantize-then-matmul
    pytest --pyargs loom.testing --loom-platform NAME     # device, memory, dist backend, graphs

The checks are the ones loom's own plugins pass (its CI runs the kit on them); docs/plugins.md
lists them. ``attention_cases`` and ``quant_cases`` hold the cases and references, for tests
of one's own.
"""
