"""The private names of our dependencies that the router relies on, declared in one place
per dependency.

The router reaches into httpx, httpcore, waitress and sentry-sdk where their public API
stops short (see each module for why). Each dependency has one module, named for it, that
alone touches its private names: ``upstream/httpx_internals.py``,
``upstream/httpcore_internals.py``, ``server/waitress_internals.py`` and
``observe/sentry_internals.py``. Each lists what it relies on as ``PrivateName``s, and
``tests/test_dependency_internals.py`` checks every one against the installed version, so
an upgrade that removes a name fails the suite with the dependency, its version and the
name, rather than a request in production. ``pyproject.toml`` bounds these dependencies
below their next minor release for the same reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import version


@dataclass(frozen=True)
class PrivateName:
    """``name`` on ``owner`` (a class; ``on_instances``: set by its ``__init__``)."""

    owner: type
    name: str
    why: str
    on_instances: bool = False

    def present(self, instances: Iterable[object]) -> bool:
        if not self.on_instances:
            return hasattr(self.owner, self.name)
        return any(hasattr(i, self.name) for i in instances if isinstance(i, self.owner))


def missing(
    distribution: str, names: Iterable[PrivateName], instances: Iterable[object] = ()
) -> list[str]:
    """A line for each name that ``distribution``'s installed version no longer has.

    ``instances``: live objects of the owners of names set on instances (a class alone
    cannot tell)."""
    live = list(instances)
    return [
        f"{distribution} {version(distribution)} has no {n.owner.__qualname__}.{n.name} ({n.why})"
        for n in names
        if not n.present(live)
    ]
