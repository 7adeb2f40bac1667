"""A real Mosquitto broker for tests: own port, own config, own persistence directory.

The launcher lives in :mod:`coordinator.demo.broker` (``lepton demo`` uses it too).
"""

from __future__ import annotations

from lepton.coordinator.demo.broker import MosquittoBroker as Broker
from lepton.coordinator.demo.broker import free_port, mosquitto_binary

__all__ = ["Broker", "free_port", "mosquitto_binary"]
