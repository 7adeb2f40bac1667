"""What a coordinator feature contributes, and how the service runs it.

A feature is one capability of the coordinator built on the daemon's runtime (the MQTT link,
the store, leadership, the HTTP server): tasks and their scheduling, the model registry,
federated jobs; later staged rollouts, AutoML studies, authentication. The service
(:class:`lepton.coordinator.service.Coordinator`) knows features only through
:class:`Feature`, the way Celery workers know their bootsteps and Home Assistant its
integrations:

1. it **builds** every feature in ``Coordinator._build()``, whether or not HTTP is enabled,
   passing each exactly what it uses (repositories, the blob store, the config, a base URL
   callable, wake-up callbacks) and never the coordinator itself. A constructor does no
   I/O: the feature's tables may not exist yet;
2. it **makes the schema** in one place (``Coordinator._create_tables`` calls
   ``Store.create_schema``): the store's Alembic migrations bring the database to head
   under their start-up lock (replicas may start at the same moment), and every feature's
   :attr:`~Feature.metadata` is checked to exist. A feature's tables are declared in its
   ``tables.py`` and created by a migration revision
   (:mod:`lepton.coordinator.store.migrations`), like the store's own. Then it calls
   :meth:`~Feature.start` on each feature, in order, on the event loop: this is where a
   feature reads its database state (a shared secret, say);
3. it mounts every feature's :meth:`~Feature.routers` on the HTTP app (when HTTP is on);
4. it runs each of :meth:`~Feature.leader_loops` through ``Leadership.lead``: the loop
   gets the lease of each term of leadership and is cancelled when the term ends (fence
   leader-only writes with that lease);
5. it hands each feature the outcome of every batch of applied device results
   (:meth:`~Feature.on_results`, in the result worker's thread: wake your own loops
   thread-safely and return at once), and every batch of applied births and wills
   (:meth:`~Feature.on_states`, in the same thread: the release registry keeps devices'
   update status);
6. on shutdown it cancels the leader loops, then awaits every feature's :meth:`~Feature.drain`
   before giving the lease up and before the device-message and capacity drains.

A new feature (``coordinator/rollout/``, ``coordinator/automl/``, ``coordinator/auth/``)
subclasses :class:`BaseFeature`, overrides what it contributes, and is added to the list
``Coordinator._features()`` returns. Features that need another feature's object (federated
jobs need the model registry's blob store) get it as a constructor argument, so the build
order is the dependency order. A feature's package does not import the service (an
import-linter contract).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Protocol, TypeAlias

from fastapi import APIRouter
from sqlalchemy import MetaData

from lepton.coordinator.store.devices import StateUpdate
from lepton.coordinator.store.records import Lease, ResultOutcome

#: A leader-only loop: one call per term of leadership, cancelled when the term ends.
LeaderLoop: TypeAlias = Callable[[Lease], Coroutine[Any, Any, None]]


class Feature(Protocol):
    """One capability of the coordinator (see module doc)."""

    #: Short name, unique per coordinator: log lines, and the prefix of its task names.
    name: str

    @property
    def metadata(self) -> MetaData | None:
        """The feature's SQLAlchemy tables (None: it keeps none)."""
        ...

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Once its tables exist, on the event loop: read state, bind thread-safe wake-ups."""
        ...

    def routers(self) -> Sequence[APIRouter]:
        """HTTP routes, mounted on the coordinator's app when HTTP is enabled."""
        ...

    def leader_loops(self) -> Mapping[str, LeaderLoop]:
        """Task name -> loop run only while this process holds the scheduling lease."""
        ...

    def on_results(self, outcomes: Sequence[ResultOutcome]) -> None:
        """A batch of device results was applied (worker thread; return at once)."""
        ...

    def on_states(self, states: Sequence[StateUpdate]) -> None:
        """A batch of births and wills was applied (worker thread; an exception makes the
        batch be applied again)."""
        ...

    async def drain(self) -> None:
        """Shutdown, after the leader loops ended: finish or hand off in-flight work."""
        ...


class BaseFeature:
    """A :class:`Feature` that contributes nothing; subclasses override what they add."""

    name = "feature"

    @property
    def metadata(self) -> MetaData | None:
        return None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        return None

    def routers(self) -> Sequence[APIRouter]:
        return ()

    def leader_loops(self) -> Mapping[str, LeaderLoop]:
        return {}

    def on_results(self, outcomes: Sequence[ResultOutcome]) -> None:
        return None

    def on_states(self, states: Sequence[StateUpdate]) -> None:
        return None

    async def drain(self) -> None:
        return None
