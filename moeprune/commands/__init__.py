"""CLI subcommands registered by :mod:`moeprune.cli` (see ``COMMAND_MODULES`` there)."""
