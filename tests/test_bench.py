"""`loom bench latency | throughput` end to end on a tiny model (CPU, float32), with and
without --compare hf, and the helpers the figures rest on."""
from __future__ import annotations

import json

import pytest

from loom.bench.common import format_table, summarize
from loom.cli import main

ENGINE = ["--dtype", "float32", "--max-model-len", "64", "--max-num-seqs", "8"]
KEYS = {"benchmark", "commit", "device", "command", "config", "figures"}


def bench(tmp_path, capsys, *argv) -> dict:
    path = tmp_path / "result.json"
    assert main(["bench", *argv, *ENGINE, "--json", str(path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.split()[0] in ("loom", "hf", "roofline", "hf_static_compiled",  # the table
                               "oracle", "ngram")                               # ends it
    record = json.loads(path.read_text())
    assert set(record) == KEYS
    assert record["command"][:3] == ["loom", "bench", argv[0]]
    assert record["config"]["dtype"] == "float32"
    assert record["device"].startswith("cpu: ")
    return record["figures"]


def test_summarize_matches_known_percentiles():
    s = summarize(list(range(1, 101)))
    assert s == pytest.approx({"mean": 50.5, "median": 50.5, "p99": 99.01})
    assert summarize([2.0, 1.0, 4.0]) == pytest.approx({"mean": 7 / 3, "median": 2.0,
                                                       "p99": 3.96})
    assert summarize([]) is None


def test_format_table_aligns_columns():
    lines = format_table(["a", "bb"], [[1, 2.5], [None, 0.01234]]).splitlines()
    assert lines == ["a      bb", "-  ------", "1    2.50", "-  0.0123"]


def test_latency(tiny_models, tmp_path, capsys):
    f = bench(tmp_path, capsys, "latency", str(tiny_models["llama"]), "--batch-size", "1", "3",
              "--input-len", "8", "--output-len", "6", "--num-iters", "2",
              "--num-iters-warmup", "1", "--copy-gib", "0.01")
    assert [b["batch_size"] for b in f["batches"]] == [1, 3]
    for b in f["batches"]:
        assert 0 < b["prefill_ms"]["median"] <= b["e2e_ms"]["median"]
        assert b["decode_step_ms"] > 0 and b["decode_tok_s"] > 0 and b["output_tok_s"] > 0
    roof = f["batches"][0]["roofline"]
    assert roof["weight_bytes"] > 0 and roof["copy_bandwidth_gb_s"] > 0 and roof["share"] > 0
    assert "roofline" not in f["batches"][1]
    startup = f["startup"]
    assert 0 < startup["engine_ready_s"] <= startup["first_token_s"]


def test_throughput_and_save(tiny_models, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = bench(tmp_path, capsys, "throughput", str(tiny_models["llama"]), "--num-prompts", "4",
              "--input-len", "8", "--output-len", "6", "--save")
    assert f["num_output_tokens"] == 4 * 6 and f["num_prompt_tokens"] == 4 * 8
    assert f["requests_per_s"] > 0 and 0 < f["output_tok_s"] < f["total_tok_s"]
    assert 0 < f["ttft_ms"]["mean"] <= f["e2e_ms"]["mean"] and f["tpot_ms"]["median"] > 0
    saved = list((tmp_path / "benchmarks" / "results").glob("throughput-llama-*.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["figures"] == f


@pytest.mark.slow   # compiles HF's decode step on the CPU: ~20 s with a cold inductor cache
def test_latency_compare_hf_dummy_weights(tiny_models, tmp_path, capsys):
    """The Llama-3-8B path: dummy weights built with from_config; static cache compiled."""
    f = bench(tmp_path, capsys, "latency", str(tiny_models["llama"]), "--load-format", "dummy",
              "--skip-tokenizer-init", "--batch-size", "1", "--input-len", "8",
              "--output-len", "6", "--num-iters", "2", "--num-iters-warmup", "1",
              "--copy-gib", "0.01", "--compare", "hf", "--hf-num-iters", "2",
              "--hf-num-iters-warmup", "1")
    b = f["batches"][0]
    for name in ("hf", "hf_static_compiled"):
        assert "error" not in b[name], b[name]
        assert b[name]["decode_tok_s"] > 0 and b[name]["output_tok_s"] > 0
        assert b[name]["loom_ratio"]["decode_tok_s"] == pytest.approx(
            b["decode_tok_s"] / b[name]["decode_tok_s"])


def test_throughput_compare_hf(tiny_models, tmp_path, capsys):
    f = bench(tmp_path, capsys, "throughput", str(tiny_models["llama"]), "--num-prompts", "4",
              "--input-len", "8", "--output-len", "6", "--compare", "hf", "--hf-batch-size", "3")
    hf = f["hf"]
    assert "error" not in hf, hf
    assert hf["num_output_tokens"] == 4 * 6 and hf["output_tok_s"] > 0
    assert hf["loom_ratio"]["output_tok_s"] == pytest.approx(f["output_tok_s"] / hf["output_tok_s"])


def test_left_pad():
    import torch

    from loom.bench.hf_compare import PAD, left_pad

    ids, mask = left_pad([[5, 6, 7], [8]], torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [PAD, PAD, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_bad_size_is_an_error(tiny_models, capsys):
    assert main(["bench", "throughput", str(tiny_models["llama"]), "--num-prompts", "0"]) == 2
    assert "--num-prompts: must be > 0" in capsys.readouterr().err


def test_latency_speculative_sweep(tiny_models, tmp_path, capsys):
    """Plain decoding, then the oracle at each k and acceptance rate, in one process."""
    f = bench(tmp_path, capsys, "latency", str(tiny_models["llama"]), "--batch-size", "2",
              "--input-len", "8", "--output-len", "20", "--num-iters", "1",
              "--num-iters-warmup", "1", "--speculative",
              "{method: oracle, num-speculative-tokens: 2}", "--spec-k", "2", "3",
              "--spec-acceptance-rate", "1.0", "0.0")
    assert f["method"] == "oracle" and f["plain"][0]["decode_tok_s"] > 0
    runs = {(r["num_speculative_tokens"], r["acceptance_rate_set"]): r for r in f["runs"]}
    assert set(runs) == {(2, 1.0), (2, 0.0), (3, 1.0), (3, 0.0)}
    for k in (2, 3):
        perfect, hopeless = runs[k, 1.0], runs[k, 0.0]
        assert perfect["acceptance_rate"] == 1.0 and perfect["mean_accepted_length"] > k
        assert perfect["oracle_off_path"] == 0
        assert hopeless["acceptance_rate"] == 0.0 and hopeless["mean_accepted_length"] == 1.0
        assert perfect["steps"] < hopeless["steps"]
        assert perfect["steps_ahead"] < hopeless["steps_ahead"]     # backoff steps go ahead
        assert perfect["speedup_decode"] > 0 and perfect["output_tok_s"] > 0


def test_latency_speculative_ngram_self_repeat(tiny_models, tmp_path, capsys):
    f = bench(tmp_path, capsys, "latency", str(tiny_models["llama"]), "--batch-size", "1",
              "--input-len", "24", "--output-len", "16", "--num-iters", "1",
              "--num-iters-warmup", "0", "--spec-prompts", "self-repeat", "--speculative",
              '{"method": "ngram", "num-speculative-tokens": 3, "prompt-lookup-min": 1}')
    (run,) = f["runs"]
    assert f["workload"] == "self-repeat" and run["spec_decode"]["num_draft_tokens"] > 0
    assert main(["bench", "latency", str(tiny_models["llama"]), "--speculative",
                 "{method: ngram, num-speculative-tokens: 2}", "--spec-acceptance-rate",
                 "0.5"]) == 2
    assert "--spec-acceptance-rate: only for method oracle" in capsys.readouterr().err
