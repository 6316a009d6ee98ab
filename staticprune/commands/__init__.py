"""`staticprune` subcommands that live in their own module (registered in staticprune.cli.COMMAND_MODULES)."""
