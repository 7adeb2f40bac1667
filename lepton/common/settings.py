"""One settings loader for every Lepton configuration: the agent's, the coordinator's, a job's.

A schema is a tree of frozen dataclasses: a field whose type is a dataclass is a section
(a TOML table; ``Optional`` makes the whole section optional), a field typed ``dict[str, V]``
is an open table (any keys, each a ``V``), and every other field is a key. Bounds and
patterns are written on the type, as in the wire protocol: ``Annotated[int, Meta(ge=1)]``.
A field whose file name is a Python keyword names it in its metadata
(``field(metadata={"key": "class"})``). Cross-field rules stay in the schema's
``__post_init__`` and raise :class:`ConfigError` with ``key`` set.

Layers, each winning over the one before:

1. the dataclass defaults;
2. a TOML file (or an already parsed mapping: a job's JSON body), tables for sections;
3. environment variables: ``LEPTON_`` + the dotted key with ``_`` for ``.``, upper-cased
   (``broker.port`` -> ``LEPTON_BROKER_PORT``); ``LEPTON_<TABLE>_<NAME>`` sets one entry of
   an open table (the name lower-cased). A variable under a section's prefix that names no
   key is refused; other ``LEPTON_*`` variables belong to other programs and are ignored;
4. overrides by dotted key (CLI flags: ``--broker-port``, or ``--set broker.port=1884``).

Every value goes through one coercion (:func:`coerce`): a string from the environment or a
flag becomes the declared type (``"true"``/``"yes"``/``"on"``, ``"12"``, ``"a,b"`` for a
list, ``""``/``"none"`` for ``None``; a file's values are typed already), then msgspec
checks the type and its bounds. An open table given whole (a file's table, ``--data
a=x,b=y``) replaces the one before; a single entry (``LEPTON_DATA_A``, ``data.a``) is added
to it. Unknown sections and keys are refused by name. Every failure is one
:class:`ConfigError` naming the key and where its value came from (the file's path,
``env LEPTON_BROKER_PORT``, ``flag --broker-port``).
"""

from __future__ import annotations

import dataclasses
import functools
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar, get_args, get_origin

from lepton.common.coerce import coerce, strip_optional, unwrap
from lepton.common.errors import ConfigError

__all__ = ["ENV_PREFIX", "ConfigError", "Key", "coerce", "env_name", "flag_name", "keys", "load"]

T = TypeVar("T")
ENV_PREFIX: Final = "LEPTON_"


def env_name(key: str, prefix: str = ENV_PREFIX) -> str:
    """``broker.port`` -> ``LEPTON_BROKER_PORT``."""
    return prefix + key.replace(".", "_").upper()


def flag_name(key: str) -> str:
    """``broker.reconnect_min_s`` -> ``--broker-reconnect-min-s``."""
    return "--" + key.replace(".", "-").replace("_", "-")


# ---------------------------------------------------------------- the schema as a key table


@dataclass(frozen=True, slots=True)
class Key:
    """One key of a schema: its dotted name and declared type (``Annotated`` kept)."""

    name: str
    hint: Any
    required: bool = False
    #: ``dict[str, V]``: an open table; ``entry`` is ``V``.
    table: bool = False
    entry: Any = None


@dataclass(frozen=True, slots=True)
class _Section:
    cls: type[Any]
    optional: bool


def _section_type(hint: Any) -> _Section | None:
    inner, optional = strip_optional(hint)
    if isinstance(inner, type) and dataclasses.is_dataclass(inner):
        return _Section(inner, optional)
    return None


def _table_entry(hint: Any) -> Any:
    """``V`` of an open table ``dict[str, V]`` (or ``Mapping``); None for any other type."""
    base = unwrap(hint)[0]
    if get_origin(base) in (dict, Mapping):
        return get_args(base)[1]
    return None


def _key_name(f: dataclasses.Field[Any]) -> str:
    """The key's name in files: the field's, or ``metadata={"key": ...}`` where the name is a
    Python keyword (``[device] class`` is the field ``class_``)."""
    return str(f.metadata.get("key", f.name))


def _tree(schema: type[Any]) -> tuple[dict[str, Key], dict[str, _Section]]:
    anything: Any = schema  # a class is hashable; mypy's type[Any] is not Hashable to it
    return _tree_cached(anything)


@functools.cache
def _tree_cached(schema: Any) -> tuple[dict[str, Key], dict[str, _Section]]:
    """Every key (dotted) and every section (dotted path, ``""`` for the root) of a schema."""
    found: dict[str, Key] = {}
    sections: dict[str, _Section] = {"": _Section(schema, optional=False)}

    def walk(prefix: str, cls: type[Any]) -> None:
        hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            name = f"{prefix}{_key_name(f)}"
            hint = hints[f.name]
            section = _section_type(hint)
            if section is not None:
                sections[name] = section
                walk(f"{name}.", section.cls)
                continue
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            entry = _table_entry(hint)
            found[name] = Key(name, hint, required, entry is not None, entry)

    walk("", schema)
    return found, sections


def keys(schema: type[Any]) -> dict[str, Key]:
    """Every key of ``schema`` by dotted name, in declaration order of the sections."""
    return dict(_tree(schema)[0])


# ---------------------------------------------------------------- layers


@dataclass(slots=True)
class _Values:
    """What the layers set so far: dotted key -> (value, source)."""

    schema: type[Any]
    values: dict[str, tuple[Any, str]] = dataclasses.field(default_factory=dict)
    #: Sections a layer named (an optional section exists once named, even empty).
    named: set[str] = dataclasses.field(default_factory=set)

    def set(self, key: Key, value: Any, source: str, *, text: bool = True) -> None:
        """A whole value; for an open table, the whole table (it replaces the one before)."""
        if key.table:
            self.values[key.name] = (_table_entries(key, value, source, text), source)
        else:
            self.values[key.name] = (coerce(key.name, key.hint, value, source, text=text), source)
        self._name_sections(key.name)

    def set_entry(self, key: Key, name: str, value: Any, source: str) -> None:
        """One entry of an open table, added to (or replacing one of) the entries before."""
        old = self.values.get(key.name)
        entries = _table_entries(key, {name: value}, source, text=True)
        self.values[key.name] = ({**(old[0] if old else {}), **entries}, source)
        self._name_sections(key.name)

    def _name_sections(self, dotted: str) -> None:
        parts = dotted.split(".")
        for i in range(1, len(parts)):
            self.named.add(".".join(parts[:i]))


def _table_entries(key: Key, value: Any, source: str, text: bool) -> dict[str, Any]:
    """An open table's entries: a mapping, or ``name=value,name=value`` text."""
    if text and isinstance(value, str):
        pairs: dict[str, Any] = {}
        for part in (p.strip() for p in value.split(",")):
            if not part:
                continue
            name, sep, item = part.partition("=")
            if not sep or not name.strip():
                raise ConfigError(
                    f"{key.name}: entries must be name=value (got {value!r}, from {source})",
                    key=key.name,
                    source=source,
                )
            pairs[name.strip()] = item.strip()
        value = pairs
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{key.name}: must be a table (got {value!r}, from {source})",
            key=key.name,
            source=source,
        )
    return {
        str(name): coerce(f"{key.name}.{name}", key.entry, item, source, text=text)
        for name, item in value.items()
    }


def _from_mapping(into: _Values, data: Mapping[str, Any], source: str) -> None:
    """Nested tables (parsed TOML or JSON) onto ``into``; unknown names are refused."""
    found, sections = _tree(into.schema)
    stack: list[tuple[str, Mapping[str, Any]]] = [("", data)]
    while stack:
        prefix, table = stack.pop()
        if prefix:
            into.named.add(prefix.rstrip("."))
        for name, value in table.items():
            dotted = f"{prefix}{name}"
            if dotted in sections:
                if value is None and sections[dotted].optional:
                    continue
                if not isinstance(value, Mapping):
                    raise ConfigError(
                        f"{source}: [{dotted}] must be a table", key=dotted, source=source
                    )
                stack.append((f"{dotted}.", value))
            elif dotted in found:
                if value is not None or not found[dotted].required:
                    into.set(found[dotted], value, source, text=False)
            elif not prefix:
                raise ConfigError(
                    f"{source}: unknown section [{name}]"
                    if isinstance(value, Mapping)
                    else f"{source}: unknown key {dotted}",
                    key=dotted,
                    source=source,
                )
            else:
                raise ConfigError(f"{source}: unknown key {dotted}", key=dotted, source=source)


def _from_env(into: _Values, env: Mapping[str, str], prefix: str) -> None:
    found, sections = _tree(into.schema)
    by_name = {env_name(k, prefix): found[k] for k in found if not found[k].table}
    tables = sorted(
        ((env_name(k, prefix) + "_", found[k]) for k in found if found[k].table),
        key=lambda item: -len(item[0]),
    )
    section_prefixes = tuple(env_name(s, prefix) + "_" for s in sections if s and "." not in s)
    for var in sorted(env):
        value = env[var]
        source = f"env {var}"
        if var in by_name:
            into.set(by_name[var], value, source)
            continue
        table = next((key for start, key in tables if var.startswith(start)), None)
        if table is not None:
            entry = var[len(env_name(table.name, prefix)) + 1 :].lower()
            into.set_entry(table, entry, value, source)
        elif var.startswith(section_prefixes):
            raise ConfigError(f"unknown environment variable {var}", key=var, source=source)


def _from_overrides(
    into: _Values, overrides: Mapping[str, Any], label: Callable[[str], str]
) -> None:
    found, _ = _tree(into.schema)
    tables = sorted((k for k in found if found[k].table), key=lambda k: -len(k))
    for name, value in overrides.items():
        if value is None:
            continue
        source = label(name)
        if name in found:
            into.set(found[name], value, source)
            continue
        table = next((t for t in tables if name.startswith(f"{t}.")), None)
        if table is None:
            raise ConfigError(f"unknown key {name} ({source})", key=name, source=source)
        into.set_entry(found[table], name[len(table) + 1 :], value, source)


# ---------------------------------------------------------------- building


def _source_of(into: _Values, key: str | None) -> str | None:
    """Where the value of ``key`` (or of the table holding it) came from, if a layer set it."""
    parts = (key or "").split(".")
    for end in range(len(parts), 0, -1):
        found = into.values.get(".".join(parts[:end]))
        if found is not None:
            return found[1]
    return None


def _build(into: _Values) -> Any:
    found, sections = _tree(into.schema)

    def make(path: str) -> Any:
        cls = sections[path].cls
        prefix = f"{path}." if path else ""
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            dotted = f"{prefix}{_key_name(f)}"
            if dotted in sections:
                if dotted in into.named:
                    kwargs[f.name] = make(dotted)
                elif sections[dotted].optional:
                    kwargs[f.name] = None  # else the field's default (factory) builds it
            elif dotted in into.values:
                kwargs[f.name] = into.values[dotted][0]
            elif found[dotted].required:
                raise ConfigError(f"{dotted}: is required", key=dotted)
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            source = _source_of(into, exc.key)
            if exc.source is None and source is not None:
                raise ConfigError(f"{exc} (from {source})", key=exc.key, source=source) from exc
            raise

    return make("")


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file's tables, or a :class:`ConfigError` naming the file."""
    try:
        with path.expanduser().open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}", source=str(path)) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}", source=str(path)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}", source=str(path)) from exc


def load(
    schema: type[T],
    *,
    file: Path | None = None,
    data: Mapping[str, Any] | None = None,
    data_source: str = "data",
    env: Mapping[str, str] | None = None,
    env_prefix: str = ENV_PREFIX,
    overrides: Mapping[str, Any] | None = None,
    override_label: Callable[[str], str] = lambda key: f"override {key}",
) -> T:
    """An instance of ``schema`` from defaults -> ``file`` (or ``data``) -> ``env`` ->
    ``overrides``; ``env`` None means no environment layer (pass ``os.environ`` for it)."""
    into = _Values(schema)
    if file is not None:
        _from_mapping(into, read_toml(file), str(file))
    if data is not None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{data_source}: must be a table", source=data_source)
        _from_mapping(into, data, data_source)
    if env is not None:
        _from_env(into, env, env_prefix)
    if overrides:
        _from_overrides(into, overrides, override_label)
    result: T = _build(into)
    return result
