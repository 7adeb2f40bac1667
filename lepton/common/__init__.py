"""Code both sides share that is not the wire contract: the error root, the settings loader,
TLS contexts, and release signing and verification.

Pure: the standard library, msgspec and cryptography only, so it imports on a device. Nothing
else in ``lepton`` is imported from here but the release structures of
``lepton.protocol.releases`` (an import-linter contract checks it).
"""
