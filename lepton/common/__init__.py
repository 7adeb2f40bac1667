"""Code both sides share that is not the wire contract: the error root and the settings loader.

Pure: the standard library and msgspec only, so it imports on a device. Nothing else in
``lepton`` is imported from here (an import-linter contract checks it).
"""
