"""Registries of the extension points (methods, attacks): a name -> entry mapping that
refuses a second entry under a name already taken, so that every list the rest of memray
shows (the config schema, defaults, the CLI's choices) is derived from one place."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Generic, Iterator, TypeVar

Entry = TypeVar("Entry")


class Registry(Generic[Entry]):
    """Entries in registration order, looked up by name."""

    def __init__(self, kind: str):
        self.kind = kind  # what an entry is, for error messages: "method", "attack"
        self._entries: dict[str, Entry] = {}
        self._default: str | None = None

    def add(self, name: str, entry: Entry, default: bool = False) -> Entry:
        """Register `entry` under `name` and return it (`default`: the entry a config that
        names none gets); ValueError if the name is taken or a second entry claims the default."""
        if default and self._default is not None:
            raise ValueError(f"{self.kind} {name!r}: {self._default!r} is already the default {self.kind}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        if default:
            self._default = name
        return entry

    @property
    def default(self) -> str:
        """The name registered with `default=True`."""
        if self._default is None:
            raise LookupError(f"no {self.kind} is registered as the default")
        return self._default

    def remove(self, name: str) -> Entry:
        """Take an entry out again (tests that register a throw-away entry)."""
        return self._entries.pop(name)

    def __getitem__(self, name: str) -> Entry:
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> tuple[str, ...]:
        """Every registered name, in registration order."""
        return tuple(self._entries)

    def values(self) -> list[Entry]:
        return list(self._entries.values())


def load_entry_points(group: str) -> list[str]:
    """Import every module an installed package names under the entry-point `group`
    (`memray.methods`, `memray.attacks`, `memray.datasets`): each such unit registers
    itself when imported, like memray's own. Returns the modules imported, by entry name.

    A package declares one in its pyproject.toml:
        [project.entry-points."memray.methods"]
        vera = "my_package.vera"
    Ray workers import memray too, so the unit is registered in every process of a sweep
    where the package is installed (on a cluster: every node, e.g. by the runtime env).
    """
    loaded = []
    for point in sorted(entry_points(group=group), key=lambda p: p.name):
        try:
            point.load()
        except Exception as err:
            package = point.dist.name if point.dist is not None else "an installed package"
            raise ImportError(f"memray: the {group} unit {point.name!r} ({point.value}) of {package} failed to "
                              f"import: {type(err).__name__}: {err}") from err
        loaded.append(point.value)
    return loaded
