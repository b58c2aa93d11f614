"""`loom serve`: its flags, and running the app under uvicorn with a graceful drain.

On SIGTERM (or Ctrl-C) the server stops accepting connections, answers 503 to requests that
still arrive, lets the requests in flight finish for up to --shutdown-timeout seconds, then
cancels the rest (which aborts them) and shuts the engine down.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from loom.config import ENGINE_CORE_MODES, EngineConfig

logger = logging.getLogger("loom")


def add_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1; 0.0.0.0 for every interface)")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument("--api-key", default=os.environ.get("LOOM_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1/* (default: $LOOM_API_KEY)")
    group.add_argument("--served-model-name", nargs="+", metavar="NAME",
                       help="model names the API answers to (default: the model argument)")
    group.add_argument("--chat-template", metavar="FILE_OR_TEMPLATE",
                       help="a Jinja chat template (a file, or the template itself) instead of "
                            "the tokenizer's")
    group.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="on SIGTERM, how long requests in flight may take to finish")
    group.add_argument("--engine-core", choices=ENGINE_CORE_MODES, default="process",
                       help="where the engine core (scheduler, KV cache, model) steps: a process "
                            "of its own (default: it never waits for the GIL of the HTTP side) "
                            "or a thread of the server's process (for debugging)")
    group.add_argument("--uvicorn-log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug", "trace"])


def read_chat_template(value: str | None) -> str | None:
    """--chat-template: the template itself (it has a '{'), or a file holding one."""
    if value is None or "{" in value:
        return value
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"--chat-template: {value!r} is neither a file nor a Jinja template")
    return path.read_text()


def main(config: EngineConfig, args: argparse.Namespace) -> int:
    import uvicorn

    from loom.async_engine import AsyncEngine
    from loom.core_loop import EngineStartupError
    from loom.server.app import DrainingServer, build_app
    from loom.server.serving import ServerSettings

    chat_template = read_chat_template(args.chat_template)   # fail before loading the model
    try:
        engine = AsyncEngine(config, engine_core=args.engine_core)
    except EngineStartupError as e:
        print(f"loom: error: {e}", file=sys.stderr)
        return 1
    try:
        settings = ServerSettings(model_names=args.served_model_name or [config.model],
                                  model_root=engine.info.model_path,
                                  api_key=args.api_key or None, chat_template=chat_template)
        app = build_app(engine, settings)
        logger.info("loom: serving %s on http://%s:%d (engine core in a %s)",
                    ", ".join(settings.model_names), args.host, args.port, args.engine_core)
        DrainingServer(uvicorn.Config(app, host=args.host, port=args.port,
                                      log_level=args.uvicorn_log_level,
                                      timeout_graceful_shutdown=args.shutdown_timeout)).run()
    finally:
        if engine.client.alive:                 # the server never started, or failed
            engine.shutdown(timeout=args.shutdown_timeout)
    return 0
