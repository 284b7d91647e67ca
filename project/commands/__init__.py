"""Subcommands beside Lightning's (``python -m project compress``); each module has a ``main(argv)``."""
