"""``key=value`` tokens and YAML scenario files, turned into a ``SweepSpec``.

Value forms (each typed by the ``RunConfig`` field it sets):

- ``cache_slots=4..8``        inclusive integer range: 4, 5, 6, 7, 8
- ``cache_slots=range(4,9)``  Hydra-style, stop exclusive; ``range(4,12,2)`` with a step
- ``policy=lru,lfu,belady``   a list; its items may be ranges: ``cache_slots=4..5,7`` is 4, 5, 7
- ``pcie_GBps=25`` / ``pcie_GBps=null``   a scalar (YAML-like: null, true/false, numbers, strings)

A scenario file maps keys to a scalar or a list; a string given for a numeric key is read like a
token, so ``cache_slots: 4..8`` works there too, while a string key's value is one value, commas and
all (a path that holds a comma is given there). Command-line tokens replace the file's keys.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from experiments.config import FIELD_TYPES, POLICY_PARAM_PREFIX, ConfigError, SweepSpec, check_key, coerce
from real.bench.args import scalar_value  # the one reader of a value, shared with the engine's --policy-param
from traces.yaml_unique import safe_load_unique

_RANGE_DOTS = re.compile(r"^\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*$")
_RANGE_CALL = re.compile(r"^\s*range\(([^()]*)\)\s*$")
_LIST_COMMA = re.compile(r",(?![^(]*\))")     # a comma that separates values: not one inside range(...)
_FILE_CLASS = re.compile(r"^(.+\.py):[A-Za-z_]\w*$")     # a policy given as FILE.py:Class
_INT = re.compile(r"^\s*-?\d+\s*$")


def _typed_scalar(key: str, text: str) -> Any:
    if key in FIELD_TYPES and FIELD_TYPES[key][0] is str:
        stripped = text.strip()
        return None if stripped in ("null", "~") and FIELD_TYPES[key][1] else stripped
    return coerce(key, scalar_value(text))


def _int_range(key: str, text: str) -> list[int] | None:
    """The values of ``a..b`` or ``range(...)``, or None if ``text`` is neither."""
    if m := _RANGE_DOTS.match(text):
        lo, hi = int(m.group(1)), int(m.group(2))
        if hi < lo:
            raise ConfigError(f"{key}={text}: empty range; write the smaller bound first ({hi}..{lo})")
        return list(range(lo, hi + 1))
    if m := _RANGE_CALL.match(text):
        parts = [p.strip() for p in m.group(1).split(",")]
        if not 2 <= len(parts) <= 3 or not all(_INT.match(p) for p in parts):
            raise ConfigError(f"{key}={text}: expected range(start,stop) or range(start,stop,step) with integers")
        start, stop, *rest = (int(p) for p in parts)
        step = rest[0] if rest else 1
        if step == 0:
            raise ConfigError(f"{key}={text}: range step must not be 0")
        values = list(range(start, stop, step))
        if not values:
            raise ConfigError(f"{key}={text}: empty range (stop is exclusive)")
        return values
    return None


def parse_value(key: str, text: str) -> list[Any]:
    """The list of typed values that ``text`` gives ``key``."""
    values = _int_range(key, text)
    if values is not None:
        return [coerce(key, v) for v in values]
    if "," in text:
        items = _LIST_COMMA.split(text)
        if any(not item.strip() for item in items):
            raise ConfigError(f"{key}={text}: empty item in a list; write key=a,b,c")
        _check_no_comma_path(key, text, items)
        values = []
        for item in items:
            ranged = _int_range(key, item)
            values += [coerce(key, v) for v in ranged] if ranged is not None else [_typed_scalar(key, item)]
        return values
    return [_typed_scalar(key, text)]


def _names_file(text: str) -> bool:
    """``text`` is an existing file's path, or ``FILE.py:Class`` with an existing file."""
    text = text.strip()
    m = _FILE_CLASS.match(text)
    return Path(m.group(1) if m else text).is_file()


def _check_no_comma_path(key: str, text: str, items: list[str]) -> None:
    """Refuse a value split at its commas into items that name no file where the whole of it names one: a path
    that holds a comma, which a token cannot give (commas separate values)."""
    missing = [item.strip() for item in items if not _names_file(item)]
    if missing and _names_file(text):
        raise ConfigError(f"{key}={text.strip()}: commas separate values, and {missing[0]} is no file; "
                          f"{text.strip()} as a whole is one: to give a path that holds a comma, put it in a "
                          f"YAML scenario, where a string is one value (--config FILE.yaml holding the line "
                          f"{key}: \"{text.strip()}\")")


def parse_override(token: str) -> tuple[str, list[Any]]:
    key, sep, text = token.partition("=")
    key = key.strip()
    if not sep or not key or not text.strip():
        raise ConfigError(f"expected key=value, got {token!r} (e.g. cache_slots=4..8 or policy=lru,lfu)")
    check_key(key)
    return key, parse_value(key, text)


# The scenario the sweep runs without --config; a --config file's missing keys take its values.
DEFAULT_SCENARIO = Path(__file__).resolve().parent / "configs" / "default.yaml"


def load_scenario(path: str | Path) -> dict[str, list[Any]]:
    """A YAML mapping key -> scalar or list, as key -> typed list of values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: scenario file not found; check the --config path")
    try:
        data = safe_load_unique(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save the scenario as UTF-8 "
                          f"YAML") from None
    if data is None or data == {}:
        raise ConfigError(f"{path}: an empty scenario; give at least one key (keys left out take "
                          f"{DEFAULT_SCENARIO.relative_to(DEFAULT_SCENARIO.parents[2])}'s values), or leave out "
                          f"--config to run that default scenario")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value or key: [values], got {type(data).__name__}")
    out = {}
    for key, raw in data.items():
        key = str(key)
        try:
            check_key(key)
            items = raw if isinstance(raw, list) else [raw]
            values = []
            for item in items:
                if isinstance(item, (list, dict)):
                    raise ConfigError(f"{key}: nested lists or mappings are not allowed; give scalars")
                if isinstance(item, str) and not _is_str_key(key):
                    values.extend(parse_value(key, item))
                else:
                    values.append(coerce(key, item))
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        out[key] = values
    return out


def _is_str_key(key: str) -> bool:
    return key.startswith(POLICY_PARAM_PREFIX) or FIELD_TYPES[key][0] is str


def build_spec(tokens: list[str], config_path: str | Path | None = None) -> SweepSpec:
    """The scenario file's keys over the default scenario's (``DEFAULT_SCENARIO``: a key the file leaves out
    takes the value the command line would run, every baseline policy at 4..8 slots...), then the tokens'
    keys replacing them. Without ``config_path``, the tokens alone over ``RunConfig``'s defaults."""
    mapping = {}
    if config_path is not None:
        if Path(config_path).resolve() != DEFAULT_SCENARIO:
            mapping.update(load_scenario(DEFAULT_SCENARIO))
        mapping.update(load_scenario(config_path))
    seen = set()
    for token in tokens:
        key, values = parse_override(token)
        if key in seen:
            raise ConfigError(f"key {key!r} is given twice on the command line; give it once (a list: {key}=a,b)")
        seen.add(key)
        mapping[key] = values
    return SweepSpec.from_mapping(mapping)
