"""Command-line interface: one click group whose subcommands are imported lazily."""
