"""``covspec keys``: CurveZMQ key pairs for an edge and its devices (zmq.auth file format)."""

from __future__ import annotations

import os
from pathlib import Path

import click


@click.group()
def keys() -> None:
    """Make CurveZMQ key pairs for an edge and its devices."""


@keys.command("new")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", default="edge", show_default=True, help="Base name: writes NAME.key and NAME.key_secret.")
@click.option("--force", is_flag=True, help="Overwrite an existing key pair of that name.")
def new(directory: Path, name: str, force: bool) -> None:
    """Write a key pair into DIRECTORY: NAME.key (public) and NAME.key_secret (keep private).

    The edge serves with `--secret-key DIR/edge.key_secret`; copy each device's
    public NAME.key into the edge's `--allow-keys` folder, and give devices the
    edge's public edge.key.
    """
    import zmq.auth

    if not name or "/" in name or name.startswith("."):
        raise click.BadParameter("give a plain file name such as 'edge' or 'phone1'.", param_hint="--name")
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    if not force and (public.exists() or secret.exists()):
        raise click.UsageError(f"{public} or {secret} already exists; pass --force to overwrite it.")
    directory.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret_file, 0o600)
    click.echo(f"public key: {public_file}")
    click.echo(f"secret key: {secret_file} (keep it private)")
