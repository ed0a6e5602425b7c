"""Command-line options from dataclasses: one implementation for every ``ssp-sam`` subcommand.

A config dataclass declares each field once, with its help text (``opt``). ``add_dataclass_arguments`` turns the
fields into ``--field-name`` options typed from their annotations; options left out of the command line stay out of
the parsed namespace, so ``overrides_from_args`` returns only what the user gave and presets or environment defaults
keep the rest. argparse is used directly: the subcommands share one parser tree (``backend/cli.py``), which a
library that owns the whole command line (tyro, jsonargparse) would replace rather than extend.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Iterable, Mapping

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


def parse_bool(text: str | bool) -> bool:
    """``true/false`` (also 1/0, yes/no, on/off) -> bool; anything else is an error, never a silent False."""
    if isinstance(text, bool):
        return text
    low = str(text).strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _bool_arg(text: str) -> bool:
    try:
        return parse_bool(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def opt(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its command-line help: ``lr: float = opt(1e-4, "learning rate of ...")``."""
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _scalar_type(annotation: Any) -> type | None:
    """``bool``, ``int``, ``float`` or ``str`` behind an annotation (``X | None`` and ``Optional[X]`` unwrapped)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else None
    return annotation if annotation in (bool, int, float, str) else None


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                            only: Iterable[str] | None = None, skip: Iterable[str] = (),
                            flags: Mapping[str, tuple[str, ...]] | None = None,
                            defaults: Mapping[str, Any] | None = None) -> None:
    """Add one option per scalar field of dataclass ``cls`` (``only`` / ``skip`` select them).

    Booleans read ``--x``, ``--x true|false`` and ``--no-x``. ``flags`` renames options (``{"heldout_fraction":
    ("--heldout",)}``); ``defaults`` are the values shown in the help when they differ from the field defaults (a
    preset, the environment). Absent options are not set in the namespace (``argparse.SUPPRESS``).
    """
    hints = typing.get_type_hints(cls)
    only = set(only) if only is not None else None
    skip, flags, defaults = set(skip), dict(flags or {}), dict(defaults or {})
    for f in dataclasses.fields(cls):
        if (only is not None and f.name not in only) or f.name in skip:
            continue
        typ = _scalar_type(hints[f.name])
        if typ is None:
            raise TypeError(f"{cls.__name__}.{f.name}: only bool, int, float and str fields become options")
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        text = f.metadata.get("help") or ""
        if default is not None:
            text = f"{text} (default: {default})" if text else f"default: {default}"
        help_text = text.replace("%", "%%")
        names = flags.get(f.name, (flag(f.name),))
        if typ is bool:
            parser.add_argument(*names, dest=f.name, nargs="?", const=True, type=_bool_arg, metavar="{true,false}",
                                default=argparse.SUPPRESS, help=help_text)
            parser.add_argument("--no-" + names[0][2:], dest=f.name, action="store_const", const=False,
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        else:
            parser.add_argument(*names, dest=f.name, type=typ, default=argparse.SUPPRESS, help=help_text,
                                metavar=f.name.upper() if typ is str else None)


def overrides_from_args(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``cls`` that the command line set."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


MODEL_OPTIONS = ("variant", "checkpoint", "sam_checkpoint", "clip_checkpoint", "weights_dir", "device", "dtype",
                 "sdpa", "compile")


def add_model_args(parser: argparse.ArgumentParser, defaults: Any = None, *,
                   flags: Mapping[str, tuple[str, ...]] | None = None) -> None:
    """The options that make a :class:`ssp_sam.build.ModelConfig` (every command that loads a model uses these);
    ``defaults``: a ModelConfig whose values the help shows."""
    from ssp_sam.build import ModelConfig

    shown = dataclasses.asdict(defaults) if defaults is not None else None
    group = parser.add_argument_group("model")
    add_dataclass_arguments(group, ModelConfig, only=MODEL_OPTIONS, defaults=shown, flags=flags)


def model_config_from_args(args: argparse.Namespace, base: Any = None) -> Any:
    """``base`` (default ``ModelConfig()``) with the model options the command line gave."""
    from ssp_sam.build import ModelConfig

    return dataclasses.replace(base or ModelConfig(), **overrides_from_args(ModelConfig, args))


__all__ = ["parse_bool", "opt", "add_dataclass_arguments", "overrides_from_args", "add_model_args",
           "model_config_from_args", "MODEL_OPTIONS", "flag"]
