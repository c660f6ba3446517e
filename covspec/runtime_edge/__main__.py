"""``python -m covspec.runtime_edge MODEL_DIR [options]``: the edge runtime's own entry point.

``EdgeProcess`` launches it with ``serve_args(config)``; it serves as ``covspec edge serve``
does (``serve_until_stopped``: the same ready line and clean stop) without importing the
command-line package above it. A configuration or model folder that cannot serve exits with
status 1 and one line on stderr.
"""

import sys

from covspec.families import ModelFolderError
from covspec.runtime_edge.config import ConfigError
from covspec.runtime_edge.serve import parse_serve_args, serve_until_stopped


def main(argv: list[str]) -> int:
    model_dir, config, log_level = parse_serve_args(argv)
    try:
        serve_until_stopped(model_dir, config, log_level, echo=lambda line: print(line, flush=True))
    except (ConfigError, ModelFolderError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
