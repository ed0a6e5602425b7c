"""``python -m backend``: the same as ``ssp-sam serve`` (see backend/serving/serve.py)."""

import argparse
import sys

from backend.serving.serve import add_arguments, run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend", description="Run the SSP-SAM Label Studio backend.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
