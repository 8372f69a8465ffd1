"""`moeprune serve` (placeholder: registers nothing yet)."""


def register(subparsers) -> None:
    """Add this module's subcommand parser(s); nothing yet."""
