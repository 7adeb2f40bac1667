"""Lepton: an edge-AI fleet platform.

- ``lepton.protocol``: the wire contract both sides share (pure code, no I/O).
- ``lepton.agent``: the device daemon (``lepton-agent``).
- ``lepton.coordinator``: the cloud service and fleet CLI (``lepton``).
- ``lepton.models``: reference model definitions and small shipped artifacts.
"""
