"""The ``ssp-sam`` command: one entry point for the model library's commands and the learning side's.

It sits above the roles, so neither has to know the other: each subcommand lives in the module that owns the work
and exposes ``register_cli(subparsers)``, which adds its parser and sets ``func`` (called with the parsed arguments,
returns an exit code). ``ssp_sam`` never imports this module.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from backend.logs import configure_logging

COMMAND_MODULES = (
    "ssp_sam.predictor",         # predict
    "ssp_sam.golden",            # check-golden
    "ssp_sam.train",             # train
    "ssp_sam.evaluate",          # eval
    "ssp_sam.embed",             # embed
    "ssp_sam.data.synthetic",    # synth
    "ssp_sam.hub",               # download-weights
    "backend.learning.finetune",  # finetune
    "backend.serving.serve",     # serve
    "backend.learning.datastore.cli",  # datastore
    "backend.prelabel",          # prelabel
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssp-sam", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
