"""``python -m project SUBCOMMAND``: the one place subcommands are dispatched.

``compress`` and ``export`` run :mod:`project.commands.compress` and :mod:`project.commands.export`; everything else (``fit``, ``validate``, ``test``,
``predict``, ``--help``...) goes to the LightningCLI in :mod:`project.cli`.
"""

import sys

COMMANDS = {"compress": "project.commands.compress", "export": "project.commands.export"}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] and args[0] in COMMANDS:
        from importlib import import_module

        from project.runtime import finish_distributed

        import_module(COMMANDS[args[0]]).main(args[1:])
        finish_distributed()  # their fits may have run distributed: end it while the interpreter is whole
        return None
    from project.cli import main as cli_main

    return cli_main(None if argv is None else args)  # None: Lightning reads sys.argv itself (and does not warn)


if __name__ == "__main__":
    main()
