"""Releases: signed agent images and models, their keys, building, and the registry."""
