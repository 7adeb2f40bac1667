"""A real Mosquitto broker for tests: own port, own config, own persistence directory.

The launcher lives in :mod:`lepton.demo.broker` (``lepton-demo`` uses it too).
"""

from __future__ import annotations

from lepton.demo.broker import MosquittoBroker as Broker
from lepton.demo.broker import free_port, mosquitto_binary

__all__ = ["Broker", "free_port", "mosquitto_binary"]
