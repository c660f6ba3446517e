"""Serve a target until stopped: the one serving loop of ``covspec edge serve`` and of
``python -m covspec.runtime_edge`` (the edge runtime's own entry point, which
``EdgeProcess`` launches, so the runtime never launches a higher layer).

- ``serve_until_stopped(model_dir, config, log_level, echo)`` loads the model, starts an
  ``EdgeServer``, echoes ``READY_PREFIX + address`` once requests are served, runs until
  SIGINT or SIGTERM (or Ctrl-C while loading), stops the server cleanly and echoes
  ``covspec edge: stopped``. It raises ``ConfigError`` or ``ModelFolderError`` for a
  configuration or folder that cannot serve; the caller says so in its own way.
- ``parse_serve_args(argv)`` reads ``MODEL_DIR`` and the options ``serve_args`` writes
  (one per ``ServerConfig`` field, named by ``option_name``) and ``--log-level``, back
  into ``(model_dir, config, log_level)``: the inverse of ``serve_args``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from covspec.runtime_edge.config import ServerConfig, option_name

READY_PREFIX = "covspec edge: listening on "
LOG_LEVELS = ("debug", "info", "warning")
# ServerConfig's field types (as annotations, strings) -> the parser of an option's value
_PARSERS = {"str": str, "int": int, "float": float, "Path": Path}


def serve_until_stopped(model_dir: str | Path, config: ServerConfig, log_level: str = "info",
                        echo: Callable[[str], None] = print) -> None:
    """Serve ``model_dir`` with ``config`` until SIGINT or SIGTERM (see the module docstring)."""
    from covspec.runtime_edge.server import EdgeServer

    config.validate()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    server = EdgeServer(model_dir, config)
    previous = {}
    try:
        server.start()      # Ctrl-C while loading raises KeyboardInterrupt; nothing to clean up yet
        # From here Ctrl-C and SIGTERM both stop cleanly (SIGINT too when a shell started us ignoring it).
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        echo(READY_PREFIX + server.address)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    echo("covspec edge: stopped")


def parse_serve_args(argv: Sequence[str]) -> tuple[Path, ServerConfig, str]:
    """``MODEL_DIR [options]`` -> (model_dir, config, log_level); exits with status 2 and
    a usage message on arguments it cannot read."""
    parser = argparse.ArgumentParser(prog="python -m covspec.runtime_edge",
                                     description="Serve MODEL_DIR to devices until SIGINT or SIGTERM.")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    for field in dataclasses.fields(ServerConfig):
        if field.type == "bool":
            parser.add_argument(option_name(field), dest=field.name, action="store_true")
        else:
            parser.add_argument(option_name(field), dest=field.name, default=field.default,
                                type=_PARSERS[str(field.type).split(" |")[0]])
    args = vars(parser.parse_args(list(argv)))
    model_dir, log_level = args.pop("model_dir"), args.pop("log_level")
    return model_dir, ServerConfig(**args), log_level
