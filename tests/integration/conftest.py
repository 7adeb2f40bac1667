# The coordinator fixtures (a running service on a real broker) are shared with these tests.
from tests.coordinator.conftest import coordinator, make_coordinator

__all__ = ["coordinator", "make_coordinator"]
