"""Typed daemon configuration: one dataclass per daemon, filled from a TOML file, then the
environment, then flags (later sources win), coerced to each field's type and validated.

A bad value is one `ConfigError` line that names the setting and where it came from."""

from __future__ import annotations

import argparse
import ipaddress
import os
import tomllib
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Mapping, TypeVar

from vfmos_runtime.paths import KERNEL_SOCKET

T = TypeVar("T")
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type or out of range."""


def load_config(cls: type[T], args: argparse.Namespace, env: Mapping[str, str] | None = None,
                prefix: str = "VFM_", **derived: Any) -> T:
    """Build `cls` from `args.config` (TOML, if the namespace has it), `{prefix}NAME`
    variables and the flags in `args` that were given (not None). `derived` supplies values
    computed by the caller (defaults that depend on other settings) unless a source set them.
    A field may carry `metadata={"parse": fn}` for values no plain type describes."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in fields(cls)}
    sourced: dict[str, tuple[Any, str]] = {}
    path = getattr(args, "config", None)
    if path:
        try:
            from_file = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        unknown = sorted(set(from_file) - set(names))
        if unknown:
            raise ConfigError(f"unknown settings in {path}: {', '.join(unknown)}")
        sourced.update({k: (v, f"{path}") for k, v in from_file.items()})
    for name in names:
        key = prefix + name.upper()
        if key in env:
            sourced[name] = (env[key], f"${key}")
    for name, value in vars(args).items():
        if name in names and value is not None:
            sourced[name] = (value, f"--{name.replace('_', '-')}")
    values = {}
    for name, field in names.items():
        if name in sourced:
            raw, origin = sourced[name]
            try:
                parse = field.metadata.get("parse")
                values[name] = parse(raw) if parse else coerce(raw, hints[name])
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"bad {name} from {origin}: {exc}") from None
        elif name in derived:
            values[name] = derived[name]
        elif field.default is MISSING and field.default_factory is MISSING:
            raise ConfigError(f"{name} is required")
    config = cls(**values)
    check = getattr(config, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return config


def service_parser(prog: str, description: str, socket_name: str) -> argparse.ArgumentParser:
    """A service daemon's parser with the flags every service has: its config file, the
    state dir, its own socket, the kernel's socket and the log level."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", type=Path, help="TOML file with the settings below")
    p.add_argument("--state-dir", type=Path, help="dir of the sockets (default: as vfmd)")
    p.add_argument("--socket", type=Path, help="this service's socket "
                   f"(default: STATE_DIR/{socket_name})")
    p.add_argument("--kernel-socket", type=Path, help="vfmd's socket "
                   f"(default: STATE_DIR/{KERNEL_SOCKET})")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING (default INFO)")
    return p


def service_sockets(cfg, socket_name: str) -> None:
    """Fill a service config's unset `socket` and `kernel_socket` from its state dir."""
    cfg.socket = cfg.socket or cfg.state_dir / socket_name
    cfg.kernel_socket = cfg.kernel_socket or cfg.state_dir / KERNEL_SOCKET


def state_dir_named(args: argparse.Namespace, env: Mapping[str, str]) -> bool:
    """Whether a state dir was named (flag, environment or config file): then the data
    lives beside it (tests, `vfmctl up --state-dir`) instead of in the host's default."""
    return args.state_dir is not None or "VFM_STATE_DIR" in env or bool(args.config)


def coerce(value: Any, kind: Any) -> Any:
    """`value` (a string from the environment, or a TOML/flag value) as type `kind`."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        if value is None or value == "":
            return None
        return coerce(value, options[0])
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise ValueError(f"{value!r} is not a boolean (use true or false)")
    if kind is int:
        if isinstance(value, float) or (isinstance(value, str) and "." in value):
            raise ValueError(f"{value!r} is not a whole number")
        return int(value)
    if kind is float:
        number = float(value)
        if number != number:
            raise ValueError("NaN is not a number here")
        return number
    if kind is Path:
        return Path(value)
    if kind is str:
        return str(value)
    return value


def listen_is_loopback(listen: str) -> bool:
    """Whether HOST:PORT (or [V6]:PORT) binds loopback only; an empty host, a wildcard and
    any name but localhost may reach other hosts."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen {listen!r}: use HOST:PORT, e.g. 127.0.0.1:7070")
    host = host.removeprefix("[").removesuffix("]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
