"""What the benchmarks share: random prompts, the step loop with its clock, percentiles, the
copy-bandwidth probe, startup times, the result table and the JSON record."""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from loom.config import EngineConfig
from loom.engine import Engine
from loom.frozen_heap import frozen_heap
from loom.outputs import RequestOutput
from loom.sampling_params import SamplingParams

RESULTS_DIR = Path("benchmarks/results")
STARTUP_CLOCK = "seconds since the process started (/proc/self/stat start time)"


def add_result_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="write the results here as JSON")
    parser.add_argument("--save", action="store_true",
                        help=f"also write the JSON under {RESULTS_DIR}/")
    parser.add_argument("--compare", choices=["hf"],
                        help="run the same workload through transformers' generate too")


def require_positive(args: argparse.Namespace, *flags: str) -> None:
    for flag in flags:
        if min(np.atleast_1d(getattr(args, flag))) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')}: must be > 0")


# ---- workload ---------------------------------------------------------------------------------
def random_prompts(rng: np.random.Generator, num: int, length: int,
                   vocab_size: int) -> list[list[int]]:
    return rng.integers(0, vocab_size, size=(num, length)).tolist()


def greedy(output_len: int, ignore_eos: bool = True) -> SamplingParams:
    # Delta outputs: each step reports only new tokens, as a streaming server would.
    return SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=ignore_eos,
                          output_kind="delta")


@dataclass
class Run:
    """The clock of one generation: perf_counter stamps taken as each step() returns."""
    start: float
    end: float
    stamps: list[float]                  # the end of each step
    first_token_step: int                # the step that gave the first request its first token
    prefill_steps: int                   # steps until every request had its first token
    outputs: list[RequestOutput] = field(default_factory=list)
    records: list = field(default_factory=list)      # the engine's StepRecords
    num_output_tokens: dict[str, int] = field(default_factory=dict)
    token_ids: list[list[int]] = field(default_factory=list)   # per prompt, its first output

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def prefill(self) -> float:
        return self.stamps[self.prefill_steps - 1] - self.start

    @property
    def decode_steps(self) -> list[float]:
        return np.diff(self.stamps[self.prefill_steps - 1:]).tolist()


def run_requests(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> Run:
    """Submit every prompt at once, then step the engine until all are finished."""
    start = time.perf_counter()
    ids = [engine.add_request(prompt, params) for prompt in prompts]
    stamps, started, done, counts = [], set(), {}, {}
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    first_token_step = prefill_steps = None
    engine.core.step_records = []
    with frozen_heap():          # no full collection over start-up's objects mid-run
        while engine.has_unfinished_requests():
            # No synchronize here: with async scheduling a step's outputs are those of the step
            # before, already finished on the device, and a sync would serialize host and device.
            outputs = engine.step()
            stamps.append(time.perf_counter())
            for out in outputs:
                new_tokens = sum(len(c.token_ids) for c in out.outputs)
                tokens[out.request_id] += next((c.token_ids for c in out.outputs
                                                if c.index == 0), [])
                if new_tokens:
                    started.add(out.request_id)
                    counts[out.request_id] = counts.get(out.request_id, 0) + new_tokens
                if out.finished:
                    done[out.request_id] = out
            if first_token_step is None and started:
                first_token_step = len(stamps) - 1
            if prefill_steps is None and len(started) == len(prompts):
                prefill_steps = len(stamps)
    records, engine.core.step_records = engine.core.step_records, None
    return Run(start, stamps[-1], stamps, first_token_step, prefill_steps, list(done.values()),
               records, counts, [tokens[i] for i in ids])


def step_profile(records) -> dict:
    """Where the time went: decode-only vs mixed (prefill) steps, and how long the host waited
    for the device (a large share: device-bound; a small one: host-bound)."""
    out = {}
    for kind, picked in (("decode_only", [r for r in records if r.num_tokens == r.num_seqs]),
                         ("with_prefill", [r for r in records if r.num_tokens > r.num_seqs])):
        if picked:
            out[kind] = {"steps": len(picked),
                         "total_s": sum(r.seconds for r in picked),
                         "mean_step_ms": 1e3 * statistics.fmean(r.seconds for r in picked),
                         "median_step_ms": 1e3 * statistics.median(r.seconds for r in picked),
                         "max_step_ms": 1e3 * max(r.seconds for r in picked),
                         "mean_seqs": statistics.fmean(r.num_seqs for r in picked),
                         "mean_tokens": statistics.fmean(r.num_tokens for r in picked),
                         "device_wait_share": sum(r.wait_seconds for r in picked)
                         / max(sum(r.seconds for r in picked), 1e-9)}
    return out


# ---- figures ----------------------------------------------------------------------------------
def summarize(values) -> dict | None:
    """Mean, median and p99 (linear interpolation, as numpy's and vLLM's); None when empty."""
    if len(values) == 0:
        return None
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "median": float(np.median(a)),
            "p99": float(np.percentile(a, 99))}


def ms(values) -> list[float]:
    return [v * 1e3 for v in values]


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def copy_bandwidth(device: torch.device, synchronize, size_bytes: int, samples: int = 5,
                   copies: int = 4) -> float:
    """Device memory bandwidth in bytes/s: a large device-to-device copy, bytes read plus bytes
    written, the median of ``samples`` timings of ``copies`` back-to-back copies (device
    events where the device has them, so launch and synchronization are not counted)."""
    src = torch.ones(size_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize()
    times = []
    for _ in range(samples):
        times.append(_timed(device, synchronize, lambda: [dst.copy_(src) for _ in range(copies)]))
    return 2 * size_bytes * copies / statistics.median(times)


def _timed(device: torch.device, synchronize, fn) -> float:
    if device.type == "cpu":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    begin, end = (torch.Event(device=device, enable_timing=True) for _ in range(2))
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3


# ---- engine lifetime and startup ------------------------------------------------------------
def seconds_since_process_start() -> float | None:
    """Linux: /proc/uptime less the process start time in /proc/self/stat (10 ms ticks)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except OSError:
        return None
    start_ticks = int(stat.rpartition(")")[2].split()[19])   # field 22, starttime
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class Target:
    """What a benchmark keeps of the engine once it is freed: where and how the model ran."""
    model_path: Path
    vocab_size: int
    device: torch.device
    dtype: torch.dtype
    weight_bytes: int
    platform: object
    ready_s: float | None = None         # process start -> engine ready
    ready_clock: float = 0.0             # perf_counter when the engine was ready

    @classmethod
    def of(cls, engine: Engine) -> "Target":
        runner = engine.executor.runner
        return cls(engine.resolved.model_path, engine.model_config.vocab_size, runner.device,
                   engine.resolved.dtype, runner.decode_weight_bytes, engine.platform,
                   seconds_since_process_start(), time.perf_counter())

    def startup(self, first_token_clock: float) -> dict:
        """Process start -> engine ready and -> the first token (a perf_counter stamp)."""
        first = (None if self.ready_s is None
                 else self.ready_s + first_token_clock - self.ready_clock)
        return {"clock": STARTUP_CLOCK, "engine_ready_s": self.ready_s, "first_token_s": first}

    def free(self) -> None:
        """Give the engine's memory back (its last reference must be gone)."""
        gc.collect()
        self.platform.empty_cache()


def start_engine(config: EngineConfig) -> tuple[Engine, Target]:
    engine = Engine(config)
    return engine, Target.of(engine)


# ---- results ----------------------------------------------------------------------------------
def git_commit() -> str | None:
    """HEAD of the checkout, or $LOOM_COMMIT where the tree travelled without its .git."""
    if os.environ.get("LOOM_COMMIT"):
        return os.environ["LOOM_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def script_header(benchmark: str, script: str, argv: list[str]) -> dict:
    """The fields a benchmarks/ script's JSON starts with: what ran (``python script *argv``), on
    which commit and GPU."""
    return {"benchmark": benchmark, "commit": git_commit(),
            "device": torch.cuda.get_device_name(), "command": ["python", script, *argv]}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"cpu: {platform.processor() or _cpu_model() or platform.machine()}"
    return str(device)


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def write_record(benchmark: str, config: EngineConfig, args: argparse.Namespace,
                 target: Target, figures: dict) -> dict:
    record = {"benchmark": benchmark, "commit": git_commit(), "device": device_name(target.device),
              "command": args.argv, "config": config.to_dict(), "figures": figures}
    paths = [Path(args.json)] if args.json else []
    if args.save:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        paths.append(RESULTS_DIR / f"{benchmark}-{Path(config.model).name}-{stamp}.json")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}")
    return record


def startup_line(startup: dict) -> str:
    if startup["engine_ready_s"] is None:
        return "startup: no process start time on this system"
    return (f"startup: engine ready {startup['engine_ready_s']:.2f} s, first token "
            f"{startup['first_token_s']:.2f} s after the process started")


def format_table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"
    return str(value)
