"""One registry type for methods, data sources and tasks.

It lives at the bottom layer (beside ``QuantTarget``, the other contract tasks and methods share) so
every layer can use it without importing the layers above.

* Built-ins are listed by name -> module and imported only when one of them is asked for, so
  listing names never imports torch-heavy modules and no module has to import its registrants.
* Third-party entries come from an entry-point group: the entry point's name is the registered name,
  its value the object (or a module whose import registers it).
* Unknown names raise :class:`UnknownName` with the valid names and a "did you mean" suggestion.
* :meth:`Registry.scoped` lets a test register throw-away entries and restores the registry after;
  :meth:`Registry.isolated` also hides the built-ins and entry points (a harness test on fakes only).
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator, Mapping
from importlib import import_module
from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownName(LookupError):
    """An unknown registry name; ``str()`` is one line naming the valid choices."""

    def __str__(self) -> str:  # LookupError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """Name -> object, with lazily imported built-ins and entry points.

    ``base`` (optional): every entry must be a subclass of it. ``validate(name, obj)`` (optional) runs
    at registration after that check and raises ``ValueError`` for a bad entry. Classes get a
    ``name`` attribute set to their registered name.
    """

    def __init__(
        self,
        kind: str,
        builtins: Mapping[str, str] | None = None,
        entry_point_group: str | None = None,
        validate: Callable[[str, T], None] | None = None,
        base: type | None = None,
    ) -> None:
        self.kind = kind
        self.base = base
        self.builtins = dict(builtins or {})  # name -> module whose import registers it
        self.entry_point_group = entry_point_group
        self.validate = validate
        self._entries: dict[str, T] = {}

    # -- registration --------------------------------------------------------------------------

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        current = self._entries.get(name)
        if current is not None and current is not obj:
            raise ValueError(f"{self.kind} {name!r} is registered twice ({current} and {obj})")
        if self.base is not None and not (isinstance(obj, type) and issubclass(obj, self.base)):
            where = f"{self.base.__module__}.{self.base.__qualname__}"
            raise ValueError(f"{self.kind} {name!r} must be a subclass of {where}, got {obj!r}")
        if self.validate is not None:
            self.validate(name, obj)
        if isinstance(obj, type):
            obj.name = name  # type: ignore[attr-defined]
        self._entries[name] = obj

    @contextlib.contextmanager
    def scoped(self) -> Iterator[Registry[T]]:
        """Entries added inside the block are gone after it (tests)."""
        saved = dict(self._entries)
        try:
            yield self
        finally:
            # a built-in module imported inside the block registers only once per process: keep those
            builtin = {k: v for k, v in self._entries.items() if k in self.builtins}
            self._entries = {**saved, **builtin}

    @contextlib.contextmanager
    def isolated(self) -> Iterator[Registry[T]]:
        """No built-ins, no entry points, no entries inside the block (a test harness with fakes only);
        everything is back after it."""
        saved = (self.builtins, self.entry_point_group, self._entries)
        self.builtins, self.entry_point_group, self._entries = {}, None, {}
        try:
            yield self
        finally:
            self.builtins, self.entry_point_group, self._entries = saved

    # -- lookup --------------------------------------------------------------------------------

    def _entry_points(self) -> dict[str, object]:
        if self.entry_point_group is None:
            return {}
        return {ep.name: ep for ep in entry_points(group=self.entry_point_group)}

    def names(self) -> list[str]:
        """Every name: built-ins (in their listed order), then registered, then entry points."""
        out = list(self.builtins)
        out += [n for n in self._entries if n not in out]
        out += [n for n in self._entry_points() if n not in out]
        return out

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def get(self, name: str) -> T:
        if name in self._entries:
            return self._entries[name]
        if name in self.builtins:
            import_module(self.builtins[name])
        elif (ep := self._entry_points().get(name)) is not None:
            obj = ep.load()  # type: ignore[attr-defined]
            if name not in self._entries and not isinstance(obj, type(contextlib)):
                self.add(name, obj)  # an object entry point; a module registers itself on import
        if name not in self._entries:
            raise UnknownName(self.unknown_message(name))
        return self._entries[name]

    def load_all(self) -> dict[str, T]:
        """Every entry, imported."""
        return {name: self.get(name) for name in self.names()}

    def unknown_message(self, name: str) -> str:
        valid = self.names()
        return unknown_name_message(self.kind, name, valid)


def unknown_name_message(kind: str, name: str, valid: list[str]) -> str:
    """``unknown method 'mimq'; valid: fp, ..., mimiq; did you mean 'mimiq'?`` (one line)."""
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r}; valid: {', '.join(valid)}{hint}"
