"""The model manager: fetch by content address, verify, cache by hash, serve, swap atomically.

A ``deploy`` names a model (``name``), its content (``digest``, sha256 hex, and ``size``), where
to fetch it (``url``, http or https) and its ``format``. The manager:

- serves from the cache (``<state>/models/sha256/<digest>``, re-hashed before use) when the
  content is already there, so a cached model costs no download;
- otherwise streams it into ``<state>/models/partial/<digest>.part``, never accepting more
  than the declared ``size`` (a server sending more is refused and the part deleted), and
  resumes with a ``Range`` request after an interruption (the part file is kept between
  attempts, retried with capped exponential backoff, and between deploys of the same digest);
- verifies the sha256 before the file is moved into the cache;
- loads the new model next to the one being served and swaps a reference only once it
  loaded: requests in flight finish on the old model, which is closed when the last leaves;
- records ``name -> digest`` in ``<state>/models/index.json`` so a restart serves the same
  models;
- stays within its :class:`~lepton.agent.inference.eviction.Caps`: past the number of served models
  or their bytes, the least recently used model (never the one just deployed, never one a request
  holds) is unloaded and forgotten, and cached files past the disk cap are deleted; ``undeploy``
  unloads and removes one model on request.

A refused deploy (bad parameters, hash mismatch, truncated or corrupt file, a model that does
not match its declared input) raises :class:`ModelError`, deletes a bad file, and leaves the
model being served untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import msgspec

from lepton.agent.credentials import CoordinatorCredentials
from lepton.agent.fetch import BlobFetcher, FetchError, fsync_replace, sha256_file
from lepton.agent.inference.eviction import Caps, Loaded, cache_excess, to_evict
from lepton.agent.inference.runtimes.base import (
    ModelLoadError,
    RuntimeUnavailableError,
    runtime_for,
)
from lepton.agent.inference.served import (
    DeployOutcome,
    ModelError,
    ServedModel,
    input_mismatch,
)
from lepton.agent.origins import Origins
from lepton.protocol.tasks import DeployParams

log = logging.getLogger(__name__)

INDEX_FILE: Final = "index.json"
#: Unreferenced cached models kept (newest first) so a rollback costs no download.
KEEP_UNREFERENCED: Final = 2


class ModelManager:
    """Fetches, caches and serves the device's models. One per agent."""

    def __init__(
        self,
        root: Path,
        *,
        threads: int = 0,
        providers: tuple[str, ...] = (),
        allow_spinning: bool = False,
        max_bytes: int = 512 * 1024 * 1024,
        retries: int = 5,
        timeout: float = 30.0,
        backoff: tuple[float, float] = (0.5, 10.0),
        origins: Origins | None = None,
        caps: Caps | None = None,
        tls: ssl.SSLContext | None = None,
        credentials: CoordinatorCredentials | None = None,
    ) -> None:
        self.root = root
        self.caps = caps or Caps()
        self.threads = threads
        self.providers = providers
        self.allow_spinning = allow_spinning
        self.max_bytes = max_bytes
        self.retries = retries
        self.timeout = timeout
        self.backoff = backoff
        self._served: dict[str, ServedModel] = {}
        self._index: dict[str, dict[str, Any]] = {}
        self._name_locks: dict[str, asyncio.Lock] = {}
        self._index_lock = asyncio.Lock()
        self._index_loaded = False
        self._restore_errors: dict[str, str] = {}
        self._pending: dict[str, int] = {}  # digests fetched for deploys still in progress
        self.evictions = 0  # models unloaded to stay within the caps
        self.fetcher = BlobFetcher(
            root,
            retries=retries,
            timeout=timeout,
            backoff=backoff,
            origins=origins,
            tls=tls,
            credentials=credentials,
        )
        self.restored = asyncio.Event()

    # ------------------------------------------------------------ paths

    @property
    def origins(self) -> Origins | None:
        """Where deploys may fetch from (None: anywhere; the agent always sets it)."""
        return self.fetcher.origins

    @property
    def cache_dir(self) -> Path:
        return self.fetcher.cache_dir

    @property
    def partial_dir(self) -> Path:
        return self.fetcher.partial_dir

    def cached_path(self, digest: str) -> Path:
        return self.fetcher.cached_path(digest)

    def partial_path(self, digest: str) -> Path:
        return self.fetcher.partial_path(digest)

    # ------------------------------------------------------------ serving

    def get(self, name: str) -> ServedModel | None:
        return self._served.get(name)

    def served(self) -> list[ServedModel]:
        return [self._served[n] for n in sorted(self._served)]

    def known(self, name: str) -> bool:
        """Deployed (in the index), though perhaps not loaded yet after a restart."""
        return name in self._index

    def unavailable(self, name: str) -> str | None:
        """Why a deployed model is not served (None if it is served or was never deployed)."""
        if name in self._served or name not in self._index:
            return None
        if name in self._restore_errors:
            return f"could not be restored: {self._restore_errors[name]}"
        return "is still loading"

    @contextlib.contextmanager
    def lease(self, name: str) -> Iterator[ServedModel | None]:
        """The model served under ``name`` (None if none), kept open until the block ends.

        Enter on the event loop: taking the lease and a swap never interleave there, so a
        leased model is never closed under its user.
        """
        model = self._served.get(name)
        if model is None:
            yield None
            return
        model._enter()
        try:
            yield model
        finally:
            model._leave()

    # ------------------------------------------------------------ lifecycle

    async def restore(self) -> None:
        """Load the models the index names (at start-up). Failures are logged and skipped.

        Deploys may run meanwhile: a name deployed before its turn here keeps the new model.
        """
        try:
            await self._load_index()
            for name in list(self._index):
                async with self._name_lock(name):
                    entry = self._index.get(name)
                    if entry is None or name in self._served:
                        continue
                    try:
                        spec = msgspec.convert(entry["spec"], DeployParams)
                        path = self.cached_path(spec.digest)
                        await asyncio.to_thread(self._verify_cached, path, spec.digest)
                        model = await asyncio.to_thread(self._load, spec, path)
                    except Exception as exc:  # one bad entry must not keep the agent down
                        log.error("cannot restore model %s: %s", name, exc)  # noqa: TRY400
                        self._restore_errors[name] = f"{type(exc).__name__}: {exc}"
                        continue
                    self._served[name] = model
                    log.info("serving model %s (%s) from the cache", name, spec.digest[:12])
            await self._enforce_caps(protect=None)  # the caps may have shrunk since
        finally:
            self.restored.set()

    @staticmethod
    def _verify_cached(path: Path, digest: str) -> None:
        """The cached file is there and still hashes to its name (else deleted, ModelError)."""
        try:
            actual = sha256_file(path)
        except FileNotFoundError as exc:
            raise ModelError("missing", f"{path} is gone") from exc
        if actual != digest:
            path.unlink(missing_ok=True)
            raise ModelError("digest_mismatch", f"{path} now hashes to {actual}")

    async def _load_index(self) -> None:
        """Read the index from disk once, before anything changes or reads it."""
        async with self._index_lock:
            if not self._index_loaded:
                self._index = {**await asyncio.to_thread(self._read_index), **self._index}
                self._index_loaded = True

    def _name_lock(self, name: str) -> asyncio.Lock:
        return self._name_locks.setdefault(name, asyncio.Lock())

    def close(self) -> None:
        for model in self._served.values():
            model.retire()
        self._served.clear()

    # ------------------------------------------------------------ deploy

    async def deploy(
        self, spec: DeployParams, *, cancelled: Callable[[], bool] = lambda: False
    ) -> DeployOutcome:
        """Fetch (or find in the cache), verify, load and swap in ``spec``'s model.

        ``cancelled`` (the task's cancel check) is asked before the download, before the load
        and before the swap; once true, the deploy ends there (:class:`ModelError`
        ``cancelled``) and the model served before stays served.
        """

        def check() -> None:
            if cancelled():
                raise ModelError("cancelled", "the deploy was cancelled before the swap")

        await self._load_index()  # so the index written below keeps every other model
        cap = min(self.caps.max_loaded_bytes, self.caps.max_cache_bytes)
        if spec.size > cap:
            raise ModelError("too_large", f"size {spec.size} exceeds this device's model caps")
        async with self._name_lock(spec.name):
            current = self._served.get(spec.name)
            if current is not None and current.digest == spec.digest:
                return self._outcome(current, downloaded=0, previous=current.digest)
            self._pending[spec.digest] = self._pending.get(spec.digest, 0) + 1
            try:
                check()
                path, downloaded = await self._fetch(spec)
                check()
                model = await self._load_checked(spec, path)
                try:
                    check()
                except ModelError:
                    model.retire()
                    raise
                entry = {
                    "digest": spec.digest,
                    "spec": msgspec.to_builtins(spec),
                    "deployed_at": time.time(),
                }
                async with self._index_lock:
                    index = {**self._index, spec.name: entry}
                    try:
                        await asyncio.to_thread(self._write_index, index)
                    except OSError as exc:
                        model.retire()
                        raise ModelError("storage", f"cannot record the model: {exc}") from exc
                    self._index = index
                self._served[spec.name] = model  # the swap: new requests see the new model
                self._restore_errors.pop(spec.name, None)
                if current is not None:
                    current.retire()
            finally:
                self._pending[spec.digest] -= 1
                if not self._pending[spec.digest]:
                    del self._pending[spec.digest]
            evicted = await self._enforce_caps(protect=spec.name)
            log.info(
                "model %s now %s (%s, %d bytes downloaded, loaded in %.3f s)",
                spec.name,
                spec.digest[:12],
                "cached" if not downloaded else "fetched",
                downloaded,
                model.load_s,
            )
            outcome = self._outcome(
                model, downloaded=downloaded, previous=current.digest if current else None
            )
            return dataclasses.replace(outcome, evicted=evicted)

    @staticmethod
    def _outcome(model: ServedModel, *, downloaded: int, previous: str | None) -> DeployOutcome:
        return DeployOutcome(
            name=model.name,
            digest=model.digest,
            downloaded=downloaded,
            cached=downloaded == 0,
            load_s=model.load_s,
            previous=previous,
            runtime=model.runtime.description,
            threads=model.runtime.threads,
        )

    async def _load_checked(self, spec: DeployParams, path: Path) -> ServedModel:
        try:
            model = await asyncio.to_thread(self._load, spec, path)
        except (ModelLoadError, RuntimeUnavailableError) as exc:
            if isinstance(exc, ModelLoadError) and not self._digest_in_use(spec.digest):
                # Corrupt: never serve it, fetch it anew next time.
                await asyncio.to_thread(path.unlink, missing_ok=True)
            reason = "load_failed" if isinstance(exc, ModelLoadError) else "no_runtime"
            raise ModelError(reason, str(exc)) from exc
        if spec.input is not None and (why := input_mismatch(spec.input, model.runtime.inputs)):
            model.retire()
            raise ModelError("input_mismatch", why)
        return model

    def _keep(self) -> set[str]:
        """Digests the cache must keep: indexed, served, or being deployed."""
        keep = {e["digest"] for e in self._index.values()}
        keep |= {m.digest for m in self._served.values()}
        return keep | set(self._pending)

    def _digest_in_use(self, digest: str) -> bool:
        return any(m.digest == digest for m in self._served.values())

    def _load(self, spec: DeployParams, path: Path) -> ServedModel:
        runtime = runtime_for(
            spec.format, providers=self.providers, allow_spinning=self.allow_spinning
        )
        started = time.perf_counter()
        runtime.load(path, threads=self.threads or None)
        return ServedModel(
            name=spec.name,
            digest=spec.digest,
            format=spec.format,
            precision=spec.precision,
            size=spec.size,
            runtime=runtime,
            input=spec.input,
            load_s=time.perf_counter() - started,
        )

    # ------------------------------------------------------------ fetch

    async def _fetch(self, spec: DeployParams) -> tuple[Path, int]:
        """The verified cache path of ``spec``'s content and the bytes downloaded for it."""
        try:
            return await self.fetcher.fetch(
                digest=spec.digest, size=spec.size, url=spec.url, what=spec.name
            )
        except FetchError as exc:
            raise ModelError(exc.reason, exc.detail, stage="fetch") from exc

    # ------------------------------------------------------------ index and cache

    def _read_index(self) -> dict[str, dict[str, Any]]:
        path = self.root / INDEX_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.error("model index %s unreadable (%s); starting with no models", path, exc)  # noqa: TRY400
            return {}
        return {str(k): v for k, v in data.get("models", {}).items() if isinstance(v, dict)}

    def _write_index(self, index: dict[str, dict[str, Any]]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{INDEX_FILE}.tmp"
        tmp.write_text(json.dumps({"version": 1, "models": index}, indent=1, sort_keys=True))
        fsync_replace(tmp, self.root / INDEX_FILE)

    # ------------------------------------------------------------ caps and undeploy

    async def _enforce_caps(self, *, protect: str | None) -> tuple[str, ...]:
        """Unload least recently used models past the caps, then trim the cache; returns
        the names unloaded. A model whose deploy is under way is left to that deploy."""
        async with self._index_lock:
            loaded = [
                Loaded(m.name, m.digest, m.size, m.last_used, m.in_use)
                for m in self._served.values()
                if not self._name_lock(m.name).locked() or m.name == protect
            ]
            victims = tuple(to_evict(loaded, self.caps, protect=protect))
            if victims:
                index = {k: v for k, v in self._index.items() if k not in victims}
                await asyncio.to_thread(self._write_index, index)
                self._index = index
                for name in victims:
                    self._served.pop(name).retire()  # closed once its last user leaves
                    self.evictions += 1
                log.warning(
                    "unloaded models %s to stay within %d models / %d bytes",
                    ", ".join(victims),
                    self.caps.max_models,
                    self.caps.max_loaded_bytes,
                )
            await asyncio.to_thread(self._prune, self._keep())
        return victims

    async def undeploy(self, name: str) -> dict[str, Any]:
        """Stop serving ``name``, forget it, and delete its cached file unless another name
        uses it. Requests in flight finish on it first. :class:`ModelError` (``unknown_model``)
        if it is not deployed here."""
        await self._load_index()
        async with self._name_lock(name):
            if name not in self._index and name not in self._served:
                raise ModelError("unknown_model", f"no model named {name!r} is deployed here")
            async with self._index_lock:
                index = {k: v for k, v in self._index.items() if k != name}
                await asyncio.to_thread(self._write_index, index)
                self._index = index
                model = self._served.pop(name, None)
                self._restore_errors.pop(name, None)
                digest = model.digest if model else None
                if model is not None:
                    model.retire()
                removed = 0
                if digest is not None and digest not in self._keep():
                    path = self.cached_path(digest)
                    removed = await asyncio.to_thread(_unlink_size, path)
        log.info("model %s undeployed (%d cached bytes removed)", name, removed)
        return {"name": name, "digest": digest, "removed_bytes": removed}

    def _prune(self, keep: set[str]) -> None:
        """Delete cached models not in ``keep`` past the newest few (kept for rollbacks),
        and more of those while the cache is over its byte cap."""
        try:
            entries = [(p.name, p.stat()) for p in self.cache_dir.iterdir()]
        except FileNotFoundError:
            return
        files = [(name, st.st_size, st.st_mtime) for name, st in entries]
        for digest in cache_excess(files, keep, self.caps, spare=KEEP_UNREFERENCED):
            self.cached_path(digest).unlink(missing_ok=True)


def _unlink_size(path: Path) -> int:
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    return size
