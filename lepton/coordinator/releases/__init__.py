"""Releases: signed agent images and models, their keys, building, and the registry.

The registry (docs/releases.md): :mod:`.store` records published bundles and what devices
report about their updates, :mod:`.install` turns a release into an ``install`` task's
parameters, :mod:`.feature` plugs it into the coordinator.
"""
