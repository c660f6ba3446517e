"""``python -m covspec``: the ``covspec`` console script (``covspec.cli.main:cli``), for a
Python without the script on its PATH (a benchmark launching the command as a user runs it)."""

from covspec.cli.main import cli

if __name__ == "__main__":
    cli(prog_name="covspec")
