"""The subcommands of `iqa-dist`: argument handling, printing and output formats only.

Each module here has NAME, HELP, `add_arguments(parser)` and `run(args) -> exit status`; the work
itself is done by the library (training, scoring, experiments, bench, ...), which a notebook can
import without the CLI. What the commands share is `options.py`.
"""
