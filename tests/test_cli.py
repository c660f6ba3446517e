"""The CLI group: help works without torch; every registered command loads; an unknown one fails."""

from click.testing import CliRunner

from covspec.cli.main import SUBCOMMANDS, cli

CLI = "from covspec.cli.main import cli\ncli()\n"


def test_help_lists_every_subcommand_without_torch(no_torch):
    result = no_torch(CLI, "--help")
    assert result.returncode == 0, result.stderr
    for name in SUBCOMMANDS:
        assert name in result.stdout


def test_device_help_without_torch(no_torch):
    """`covspec device run --help` works where torch cannot be imported, and offers every
    registered drafting policy, wire format and selection method."""
    from covspec.protocol.wire import CODECS
    from covspec.runtime_device.policy import POLICIES
    from covspec.runtime_device.pruning import METHODS

    result = no_torch(CLI, "device", "run", "--help")
    assert result.returncode == 0, result.stderr
    for name in [*POLICIES, *CODECS, *METHODS]:
        assert name in result.stdout, name


def test_torch_is_really_blocked(no_torch):
    result = no_torch("import torch")
    assert result.returncode != 0 and "import of torch halted" in result.stderr


def test_every_registered_command_loads():
    import click

    for name in SUBCOMMANDS:
        command = cli.get_command(click.Context(cli), name)
        assert isinstance(command, click.Command) and command.name == name, name


def test_unknown_command_fails():
    result = CliRunner().invoke(cli, ["no-such-command"])
    assert result.exit_code == 2


def test_every_server_setting_survives_the_edge_command_line():
    """EdgeProcess launches `python -m covspec.runtime_edge` with serve_args(config), and
    `covspec edge serve` takes the same options: every field of ServerConfig, set away from
    its default, must come back through both parsers."""
    import dataclasses
    from pathlib import Path

    from covspec.cli.edge_cmd import serve
    from covspec.runtime_edge.config import ServerConfig, serve_args
    from covspec.runtime_edge.serve import parse_serve_args

    changed = {"bind": "tcp://127.0.0.1:7000", "device": "cuda:1", "dtype": "bfloat16", "max_sessions": 3,
               "max_context": 999, "max_message_bytes": 5000, "idle_timeout_s": 2.5,
               "finished_timeout_s": 0.5, "max_image_pixels": 77, "max_image_aspect": 4.0,
               "max_queue": 9, "max_batch": 5, "max_batch_tokens": 300, "prefill_chunk": 7, "prefill_tokens": 99, "edge_steps": "always", "secret_key": Path("keys/edge.key_secret"), "allow_keys": Path("keys/devices"),
               "insecure": True, "threads": 1, "regime": "phone-135m@7b-a100-hf", "kv_budget": 1 << 30,
               "prefix_cache_bytes": 1 << 28}
    assert set(changed) == {f.name for f in dataclasses.fields(ServerConfig)}, "a new field needs a value here"

    def rebuilt(args: list[str]) -> ServerConfig:
        params = serve.make_context("serve", ["model", *args]).params
        return ServerConfig(**{k: v for k, v in params.items() if k not in ("model_dir", "log_level")})

    assert rebuilt(serve_args(ServerConfig(**changed))) == ServerConfig(**changed)
    assert rebuilt(serve_args(ServerConfig())) == ServerConfig()
    for config in (ServerConfig(**changed), ServerConfig()):
        assert parse_serve_args(["model", *serve_args(config), "--log-level", "debug"]) == \
            (Path("model"), config, "debug")


def test_the_edge_runtime_entry_point_refuses_what_cannot_serve(tmp_path):
    """`python -m covspec.runtime_edge` (what EdgeProcess runs): a folder that is no model
    exits with status 1 and says why; options it does not know exit with status 2."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "covspec.runtime_edge", str(tmp_path), "--bind",
                           "tcp://127.0.0.1:*"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "no config.json" in done.stderr and "listening" not in done.stdout
    done = subprocess.run([sys.executable, "-m", "covspec.runtime_edge", str(tmp_path), "--no-such-option"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--no-such-option" in done.stderr


def test_device_run_refuses_meaningless_sampling_settings(tmp_path):
    image = tmp_path / "image.png"
    image.write_bytes(b"not read before the settings are checked")
    for option, value in (("--temperature", "1e-320"), ("--temperature", "1e308"), ("--seed", "-1"),
                          ("--seed", str(2 ** 64))):
        result = CliRunner().invoke(cli, ["device", "run", "--artifacts", str(tmp_path), "--image", str(image),
                                          "--prompt", "hi", option, value])
        assert result.exit_code == 2 and option.strip("-") in result.output, (option, value, result.output)
