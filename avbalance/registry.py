"""A small name -> factory registry, used for stages, encoders, fusions and balancers."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from avbalance.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Register factories by name; build them by name; list every name for tests."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """A decorator: ``obj`` under ``name``. A registered class gets ``name`` as its ``name``
        attribute, so the name is written once, in the decorator."""
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            if isinstance(obj, type):
                own = obj.__dict__.get("name")
                if own is not None and own != name:
                    raise ValueError(f"{self.kind} {name!r}: class {obj.__name__} names itself {own!r}")
                setattr(obj, "name", name)
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise UserError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
