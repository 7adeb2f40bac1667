"""The ``install`` and ``revert`` task handlers: take a signed agent image, go back to the
other slot.

``install`` (:class:`~lepton.protocol.tasks.InstallParams`), in order:

1. fetch the signed manifest envelope (digest and size checked by the agent's fetcher; the
   device's token goes to the coordinator's origin only), verify it against the device's
   pinned trust root (:func:`lepton.common.releases.verify_manifest`) and check it names the
   release and version the task names;
2. the running version itself: ``already_running`` (succeeded, nothing fetched);
3. :func:`~lepton.common.releases.check_policy`: an agent image, for this device's class,
   above the running version and not below the device's security floor;
4. fetch every file by its sha256 from ``blob_base`` into the task's staging directory
   (resumable: a retry of the task picks up its partial downloads; each bounded by the
   manifest's length), lay them out as the bundle and check the exact set
   (:func:`~lepton.common.releases.verify_files`);
5. hand them to the updater (:meth:`~lepton.agent.update.updater.Updater.stage`): the
   result says ``staged``; what became of it arrives in the device's update status.

A refusal (any check above, a file whose bytes do not hash to the manifest's sha256, a
device without updates enabled) fails the task with the error ``refused: <reason>:
<detail>`` (``reason`` a :data:`~lepton.protocol.releases.RefusalReason`, or
``updates_disabled``), so the coordinator counts it as the failure it is; a download that
could not complete fails it with ``fetch: <reason>: ...`` (worth a retry).

``revert`` (:class:`~lepton.protocol.tasks.RevertParams`): ask the updater to switch to the
other slot's ``to_version`` (refused as above when that slot holds another version or one
below the floor); ``already_running`` when it runs already.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import msgspec

from lepton.agent.fetch import BlobFetcher, FetchError
from lepton.agent.handlers import TaskContext, TaskError
from lepton.protocol.messages import Task
from lepton.protocol.releases import (
    InstallOutput,
    InstallParams,
    Manifest,
    RevertOutput,
    RevertParams,
)
from lepton.protocol.tasks import INSTALL, REVERT, encode_output, params_as

if TYPE_CHECKING:
    from lepton.agent.update.updater import Updater

InstallOutcome = Literal["staged", "refused", "already_running"]

#: Fetcher failures that mean the bytes served are not the manifest's: a refusal, not a retry.
TAMPERED_FETCHES: Final = frozenset({"digest_mismatch", "too_large"})


class RefusedError(TaskError):
    """An install or revert refused; its text, ``refused: <reason>: <detail>``, is the
    task's error (the coordinator reads the prefix)."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"refused: {reason}: {detail}"[:1000])


def refused(reason: str, detail: str) -> RefusedError:
    return RefusedError(reason, detail)


def _updater(ctx: TaskContext) -> Updater:
    updater = ctx.services.updater
    if updater is None:
        raise refused("updates_disabled", "updates are not enabled on this device")
    return updater


def _fetcher(ctx: TaskContext, root: Path) -> BlobFetcher:
    """A fetcher into ``root`` with the model manager's download settings (origins, TLS,
    the device's token for the coordinator's origin, retries)."""
    models = ctx.services.models
    if models is None:
        return BlobFetcher(root)
    return BlobFetcher(
        root,
        retries=models.retries,
        timeout=models.timeout,
        backoff=models.backoff,
        origins=models.origins,
        tls=models.fetcher.tls,
        credentials=models.fetcher.credentials,
    )


async def _get(
    fetcher: BlobFetcher, *, digest: str, size: int, url: str, what: str
) -> tuple[Path, int]:
    try:
        return await fetcher.fetch(digest=digest, size=size, url=url, what=what)
    except FetchError as exc:
        if exc.reason in TAMPERED_FETCHES:
            raise refused("tampered", f"{what}: {exc.detail}") from exc
        raise TaskError(f"fetch: {exc.reason}: {what}: {exc.detail}") from exc


def _place(blob: Path, dest: Path) -> None:
    """``blob`` at ``dest`` (a hard link where the file system allows, else a copy)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(blob, dest)
    except OSError:
        shutil.copyfile(blob, dest)


def _file_url(blob_base: str, digest: str) -> str:
    return blob_base + digest if blob_base.endswith("/") else f"{blob_base}/{digest}"


def _check(m: Manifest, params: InstallParams, updater: Updater, running: str) -> None:
    from lepton.common.releases import ReleaseRefused, check_policy

    if (m.name, m.version) != (params.release, params.version):
        raise ReleaseRefused(
            "malformed",
            f"the task names {params.release} {params.version}, the manifest {m.name} {m.version}",
        )
    device_class = updater.device_class
    if not device_class:
        raise ReleaseRefused("wrong_class", "this device's class is not known ([device] class)")
    check_policy(m, kind="agent", device_class=device_class, running=running, floor=updater.floor())


async def install(task: Task, ctx: TaskContext) -> dict[str, Any]:
    """Fetch, verify and stage a signed agent image (see module doc)."""
    try:
        params = params_as(InstallParams, task.params)
    except msgspec.ValidationError as exc:
        raise TaskError(f"bad_params: {exc}") from exc
    updater = _updater(ctx)
    staging = await asyncio.to_thread(updater.staging_dir, task.task_id)
    try:
        return await _install(task, ctx, params, updater, staging)
    except RefusedError:
        # Nothing of a refused release is worth keeping (a failed download is: it resumes).
        await asyncio.to_thread(shutil.rmtree, staging, ignore_errors=True)
        raise


async def _install(
    task: Task, ctx: TaskContext, params: InstallParams, updater: Updater, staging: Path
) -> dict[str, Any]:
    # Imported here, as the handlers' heavy dependencies are: cryptography loads only when
    # an update arrives.
    from lepton.common.releases import ReleaseRefused, verify_files, verify_manifest

    fetcher = _fetcher(ctx, staging / "blobs")
    path, downloaded = await _get(
        fetcher,
        digest=params.manifest_digest,
        size=params.manifest_size,
        url=params.manifest_url,
        what="manifest",
    )
    raw = await asyncio.to_thread(path.read_bytes)
    running = await asyncio.to_thread(updater.running_version)
    try:
        root = await asyncio.to_thread(updater.trust_root)
        m = verify_manifest(raw, root, now=time.time())
        if m.version == running and m.name == params.release:
            await asyncio.to_thread(shutil.rmtree, staging, ignore_errors=True)
            return _output(params, "already_running", downloaded, running)
        await asyncio.to_thread(_check, m, params, updater, running)
    except ReleaseRefused as exc:
        raise refused(exc.reason, exc.detail) from exc
    bundle = staging / "bundle"
    await asyncio.to_thread(shutil.rmtree, bundle, ignore_errors=True)
    for entry in m.files:
        if ctx.cancel.is_set():
            raise TaskError(f"cancelled: {ctx.cancel.reason}")
        blob, got = await _get(
            fetcher,
            digest=entry.sha256,
            size=entry.length,
            url=_file_url(params.blob_base, entry.sha256),
            what=entry.path,
        )
        downloaded += got
        await asyncio.to_thread(_place, blob, bundle / entry.path)
    try:
        await asyncio.to_thread(verify_files, m, bundle)
    except ReleaseRefused as exc:
        raise refused(exc.reason, exc.detail) from exc
    try:
        await asyncio.to_thread(
            lambda: updater.stage(
                manifest_raw=raw,
                manifest=m,
                files_dir=bundle,
                task_id=task.task_id,
                deadline_s=params.health_deadline_s,
            )
        )
    except ReleaseRefused as exc:
        raise refused(exc.reason, exc.detail) from exc
    # The bundle holds links to (or copies of) every file: the download cache is spent.
    await asyncio.to_thread(shutil.rmtree, staging / "blobs", ignore_errors=True)
    return _output(params, "staged", downloaded, running)


def _output(
    params: InstallParams, outcome: InstallOutcome, downloaded: int, running: str
) -> dict[str, Any]:
    out = InstallOutput(
        release=params.release,
        version=params.version,
        outcome=outcome,
        bytes_downloaded=downloaded,
        running_version=running,
    )
    return encode_output(INSTALL, out)


async def revert(task: Task, ctx: TaskContext) -> dict[str, Any]:
    """Switch back to the other slot's ``to_version`` (see module doc)."""
    try:
        params = params_as(RevertParams, task.params)
    except msgspec.ValidationError as exc:
        raise TaskError(f"bad_params: {exc}") from exc
    from lepton.common.releases import ReleaseRefused

    updater = _updater(ctx)
    running = await asyncio.to_thread(updater.running_version)
    outcome: InstallOutcome
    if running == params.to_version:
        outcome = "already_running"
    else:
        try:
            await asyncio.to_thread(
                lambda: updater.request_revert(
                    to_version=params.to_version,
                    task_id=task.task_id,
                    deadline_s=params.health_deadline_s,
                )
            )
        except ReleaseRefused as exc:
            raise refused(exc.reason, exc.detail) from exc
        outcome = "staged"
    out = RevertOutput(
        outcome=outcome,
        version=params.to_version,
        running_version=running,
    )
    return encode_output(REVERT, out)
