"""Named, toggleable components: one small registry per architecture/training axis.

Every axis that an ablation may toggle (norm type, MLP type, position scheme, ...) is a `Registry`.
Config fields of those axes are validated against `names()`, so a typo is caught before any training,
and users add their own entries with `@REG.register("name")` from a module listed in `plugins:`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from blueberry.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, axis: str):
        self.axis = axis
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ConfigError(f"{self.axis}: '{name}' is already registered")
            self._entries[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"{self.axis}: unknown name {name!r}; registered: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


# The axes. Entries are registered by the modules that implement them (blueberry.model.*, blueberry.train.*).
NORMS: Registry = Registry("model.norm")
NORM_PLACEMENTS: Registry = Registry("model.norm_placement")
POSITIONS: Registry = Registry("model.position")
MLPS: Registry = Registry("model.mlp")
INITS: Registry = Registry("model.init")
OPTIMIZERS: Registry = Registry("optim.name")
SCHEDULES: Registry = Registry("schedule.name")

# Config field path -> registry, used by config validation.
AXES: dict[str, Registry] = {
    r.axis: r for r in (NORMS, NORM_PLACEMENTS, POSITIONS, MLPS, INITS, OPTIMIZERS, SCHEDULES)
}


def load_builtin_components() -> None:
    """Import the modules whose decorators fill the registries (idempotent)."""
    import blueberry.model  # noqa: F401
    import blueberry.train.optim  # noqa: F401
    import blueberry.train.schedule  # noqa: F401
