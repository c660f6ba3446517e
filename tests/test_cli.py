"""The CLI group: help works without torch; unbuilt commands say so and fail."""

from click.testing import CliRunner

from covspec.cli.main import SUBCOMMANDS, cli

CLI = "from covspec.cli.main import cli\ncli()\n"


def test_help_lists_every_subcommand_without_torch(no_torch):
    result = no_torch(CLI, "--help")
    assert result.returncode == 0, result.stderr
    for name in SUBCOMMANDS:
        assert name in result.stdout


def test_device_help_without_torch(no_torch):
    result = no_torch(CLI, "device", "--help")
    assert result.returncode == 0, result.stderr
    assert "device" in result.stdout.lower()


def test_torch_is_really_blocked(no_torch):
    result = no_torch("import torch")
    assert result.returncode != 0 and "import of torch halted" in result.stderr


def test_unknown_command_fails():
    result = CliRunner().invoke(cli, ["no-such-command"])
    assert result.exit_code == 2
