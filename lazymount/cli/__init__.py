"""The command line: mounting, subcommands, the demo."""
