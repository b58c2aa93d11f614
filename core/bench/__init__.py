"""`loom bench latency | throughput`: vLLM-comparable figures, printed as a table and written
as JSON (--json PATH, --save: benchmarks/results/) in one record:

    {"benchmark": "latency" | "throughput", "commit": git HEAD or null,
     "device": the GPU's name or "cpu: <processor>", "command": the argv,
     "config": the resolved EngineConfig, "figures": {...}}

--compare hf runs the same workload through transformers' generate in the same process.
"""
