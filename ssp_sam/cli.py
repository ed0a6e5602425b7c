"""The ``ssp-sam`` command line.

Each subcommand lives in the module that owns the work and exposes ``register_cli(subparsers)``; that function adds
its parser and sets ``func`` (called with the parsed args, returns an exit code). Other packages contribute
subcommands through the ``ssp_sam.commands`` entry-point group (``backend`` adds ``finetune``), so this package never
imports them by name.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from importlib.metadata import entry_points

BUILTIN_COMMAND_MODULES = (
    "ssp_sam.predictor",   # predict
    "ssp_sam.golden",      # check-golden
    "ssp_sam.train",       # train
    "ssp_sam.evaluate",    # eval
    "ssp_sam.embed",       # embed
    "ssp_sam.data.synthetic",  # synth
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssp-sam", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in BUILTIN_COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a partial install (e.g. inference only) keeps the other commands
            logging.getLogger(__name__).warning("subcommands of %s unavailable: %s", name, exc)
            continue
        module.register_cli(sub)
    for ep in entry_points(group="ssp_sam.commands"):
        try:
            ep.load()(sub)
        except ImportError as exc:  # an optional contributor that is not importable must not break the rest
            logging.getLogger(__name__).debug("skipping subcommand %s: %s", ep.name, exc)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
