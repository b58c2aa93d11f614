"""The `loom` command: serve | generate | bench | plugins."""
from __future__ import annotations

import argparse
import functools
import json
import logging
import sys

from loom.config import ConfigError, add_engine_args, engine_overrides, load_config

DEMO_PROMPTS = ["The capital of France is", "Once upon a time", "The best way to learn is"]


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_pos", nargs="?", metavar="MODEL",
                        help="model directory (overrides 'model' in the config)")
    parser.add_argument("--config", help="YAML file whose keys are the long flag names")
    parser.add_argument("--model", dest="model", default=argparse.SUPPRESS,
                        help="model directory, or 'loom-demo'")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit")
    add_engine_args(parser)


def config_from_args(args: argparse.Namespace):
    return load_config(args.config, engine_overrides(args))


def _torchrun_worker(config) -> bool:
    """Under torchrun, ranks other than 0 serve rank 0's engine instead of running the command."""
    from loom.distributed.world import torchrun_rank

    if torchrun_rank() == 0:
        return False
    from loom.distributed.worker import run_from_env
    run_from_env(config)
    return True


def _config_to_run(args: argparse.Namespace):
    """The config, or None where nothing is left to run here: --print-config printed it, or
    this process was a torchrun worker rank and has served its engine."""
    config = config_from_args(args)
    if args.print_config:
        print(config.to_yaml(), end="")
        return None
    return None if _torchrun_worker(config) else config


def cmd_generate(args: argparse.Namespace) -> int:
    config = _config_to_run(args)
    if config is None:
        return 0
    from loom.llm import LLM
    from loom.sampling_params import SamplingParams

    llm = LLM(**{k: v for k, v in vars(config).items()})
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed_request,
                            ignore_eos=args.ignore_eos)
    prompts = args.prompt or DEMO_PROMPTS
    try:
        outputs = llm.generate(prompts, params, use_tqdm=not args.quiet)
    finally:
        llm.engine.shutdown()
    for out in outputs:
        if args.json:
            print(json.dumps({"prompt": out.prompt, "text": out.outputs[0].text,
                              "token_ids": out.outputs[0].token_ids,
                              "finish_reason": out.outputs[0].finish_reason}))
        else:
            print(f"--- {out.prompt!r}\n{out.outputs[0].text}\n[{out.outputs[0].finish_reason}, "
                  f"{len(out.outputs[0].token_ids)} tokens]")
    return 0


def cmd_serve(sub) -> None:
    """Register `loom serve`: the engine flags and the server's."""
    from loom.server import launch

    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    _add_config_args(serve)
    launch.add_args(serve)
    serve.set_defaults(func=functools.partial(_run_with_config, launch))


def cmd_bench(sub) -> None:
    """Register `loom bench latency | throughput`, each with the engine flags, and `loom bench
    serve`, a client of a running server."""
    from loom.bench import latency, serve, throughput

    bench = sub.add_parser("bench", help="benchmark latency, offline throughput or a server")
    kinds = bench.add_subparsers(dest="benchmark", required=True)
    for module in (latency, throughput):
        parser = kinds.add_parser(module.NAME, help=module.HELP)
        _add_config_args(parser)
        module.add_args(parser)
        parser.set_defaults(func=functools.partial(_run_with_config, module))
    parser = kinds.add_parser(serve.NAME, help=serve.HELP)
    serve.add_args(parser)
    parser.set_defaults(func=serve.main)


def _run_with_config(module, args: argparse.Namespace) -> int:
    config = _config_to_run(args)
    return 0 if config is None else module.main(config, args)


def cmd_plugins(args: argparse.Namespace) -> int:
    from loom.plugin_manager import format_report, get_plugin_manager

    print(format_report(get_plugin_manager()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loom", description="loom LLM inference engine")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    cmd_serve(sub)

    gen = sub.add_parser("generate", help="generate text offline from prompts")
    _add_config_args(gen)
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable); default: demo prompts")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed-request", type=int, default=None, help="per-request sampling seed")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--json", action="store_true", help="one JSON object per output line")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_generate)

    cmd_bench(sub)

    plugins = sub.add_parser("plugins", help="list plugins, what they register, and load errors")
    plugins.set_defaults(func=cmd_plugins)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = ["loom", *(sys.argv[1:] if argv is None else argv)]
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, ValueError) as e:
        print(f"loom: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
