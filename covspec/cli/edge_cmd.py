"""``covspec edge``: serve a target VLM for verification (imports torch only when serving)."""

from __future__ import annotations

from pathlib import Path

import click

from covspec.runtime_edge.config import DEVICES, DTYPES, EDGE_STEPS, ServerConfig
from covspec.runtime_edge.serve import LOG_LEVELS

DEFAULT = ServerConfig()


def _default_model() -> Path:
    return Path(__file__).resolve().parent.parent / "toy" / "models" / "target"


@click.group()
def edge() -> None:
    """Edge side: serve a target VLM for verification."""


@edge.command()
@click.argument("model_dir", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--bind", default=DEFAULT.bind, show_default=True,
              help="ZeroMQ endpoint to bind (tcp://HOST:PORT; port * or 0 picks a free one).")
@click.option("--device", default=DEFAULT.device, show_default=True, help=f"{', '.join(DEVICES)} or cuda:N.")
@click.option("--dtype", type=click.Choice(DTYPES), default=DEFAULT.dtype, show_default=True)
@click.option("--max-sessions", type=int, default=DEFAULT.max_sessions, show_default=True, help="Live sessions at most.")
@click.option("--max-context", type=int, default=DEFAULT.max_context, show_default=True,
              help="Tokens per session at most (context + generated).")
@click.option("--max-message-bytes", type=int, default=DEFAULT.max_message_bytes, show_default=True,
              help="Largest request accepted (also the socket's MAXMSGSIZE).")
@click.option("--idle-timeout", "idle_timeout_s", type=float, default=DEFAULT.idle_timeout_s, show_default=True,
              help="Seconds after which a silent session is dropped and its memory freed.")
@click.option("--finished-timeout", "finished_timeout_s", type=float, default=DEFAULT.finished_timeout_s,
              show_default=True, help="Seconds a session that finished generating keeps its slot.")
@click.option("--max-image-pixels", type=int, default=DEFAULT.max_image_pixels, show_default=True,
              help="Largest image accepted, in pixels (checked before decoding).")
@click.option("--max-image-aspect", type=float, default=DEFAULT.max_image_aspect, show_default=True,
              help="Longest to shortest image side at most (thin strips would blow up when resized).")
@click.option("--max-queue", type=int, default=DEFAULT.max_queue, show_default=True,
              help="Requests waiting for the model at most; beyond it the edge answers busy.")
@click.option("--max-batch", type=int, default=DEFAULT.max_batch, show_default=True,
              help="Sessions whose rounds share one target forward at most (1: unbatched).")
@click.option("--max-batch-tokens", type=int, default=DEFAULT.max_batch_tokens, show_default=True,
              help="Input tokens in one batched target forward at most.")
@click.option("--prefill-chunk", type=int, default=DEFAULT.prefill_chunk, show_default=True,
              help="Prompt tokens (after the image) one opening session runs in one forward at most: long "
                   "prompts are cut into chunks that share forwards with the other sessions' rounds (and are no "
                   "wider than the widest of those).")
@click.option("--prefill-tokens", type=int, default=DEFAULT.prefill_tokens, show_default=True,
              help="Prefill tokens (images with what precedes them, and prompt chunks) one iteration runs at "
                   "most, after the rounds; the oldest opening session always gets a piece.")
@click.option("--edge-steps", type=click.Choice(EDGE_STEPS), default=DEFAULT.edge_steps, show_default=True,
              help="When the target of an edge-led session generates by itself instead of waiting for the "
                   "device's chunks: auto (while the edge has room), always, never.")
@click.option("--secret-key", type=click.Path(dir_okay=False, path_type=Path),
              help="The edge's CurveZMQ secret key file (NAME.key_secret from `covspec keys new`).")
@click.option("--allow-keys", type=click.Path(file_okay=False, path_type=Path),
              help="Folder of device public keys (*.key) admitted; needs --secret-key.")
@click.option("--insecure", is_flag=True, help="Allow a non-loopback bind without CurveZMQ keys.")
@click.option("--threads", type=int,
              help="torch CPU threads (default: torch's choice). On a CPU shared with the device, 1 is often "
                   "much faster.")
@click.option("--regime", default=None, metavar="DEVICE@TARGET|FILE",
              help="Emulate a deployment: pad every target forward to what the regime's target model would "
                   "take on its GPU (a roofline; see `covspec plan --list`). Real time only by default.")
@click.option("--kv-budget", type=int, default=None,
              help="Bytes of KV cache the live sessions may take at most, each counted at its longest "
                   "(context + max_new_tokens); an open beyond it is answered busy (default: no bound "
                   "but --max-sessions).")
@click.option("--prefix-cache-bytes", type=int, default=DEFAULT.prefix_cache_bytes, show_default=True,
              help="Bytes of the prefix cache: sessions about an image seen recently start from the cached "
                   "KV of its context and prefill only the rest (0: off).")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True)
def serve(model_dir: Path | None, log_level: str, **settings) -> None:
    """Serve MODEL_DIR (default: the bundled toy target) to devices until Ctrl-C or SIGTERM.

    Prints one line `covspec edge: listening on ADDRESS` once requests are served,
    and logs one line per session when it ends.
    """
    from covspec.runtime_edge.config import ConfigError

    try:
        config = ServerConfig(**settings).validate()
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None

    from covspec.families import ModelFolderError
    from covspec.runtime_edge.serve import serve_until_stopped

    try:
        serve_until_stopped(model_dir or _default_model(), config, log_level, echo=click.echo)
    except (ConfigError, ModelFolderError) as exc:
        raise click.ClickException(str(exc)) from None
