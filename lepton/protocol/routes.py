"""The coordinator's HTTP paths, defined once: the route templates its API serves and the
function that fills one in, for its own clients and for the URLs it hands to devices.

Templates use FastAPI's ``{name}`` placeholders; :func:`path` quotes every value, so an id
can never reach another route (``..``, ``/`` and ``?`` are escaped).
"""

from __future__ import annotations

from typing import Final
from urllib.parse import quote

HEALTH: Final = "/v1/health"
DEVICES: Final = "/v1/devices"
DEVICE: Final = "/v1/devices/{device_id}"
TASKS: Final = "/v1/tasks"
TASK: Final = "/v1/tasks/{task_id}"
TASK_EXPLAIN: Final = "/v1/tasks/{task_id}/explain"
TASK_CANCEL: Final = "/v1/tasks/{task_id}/cancel"
BLOB: Final = "/v1/blobs/{digest}"
MODELS: Final = "/v1/models"
MODEL: Final = "/v1/models/{name}"
MODEL_VERSION: Final = "/v1/models/{name}/{version}"
MODEL_DEPLOY: Final = "/v1/models/{name}/deploy"
FL_JOBS: Final = "/v1/fl/jobs"
FL_JOB: Final = "/v1/fl/jobs/{job_id}"
FL_JOB_STOP: Final = "/v1/fl/jobs/{job_id}/stop"
FL_UPLOAD: Final = "/v1/fl/uploads/{job_id}/{round_no}/{device_id}"
RELEASES: Final = "/v1/releases"  # POST: publish a bundle (rollouts:write); GET: list
RELEASE: Final = "/v1/releases/{name}/{version}"  # GET: its manifests and files
AUDIT: Final = "/v1/audit"
ROLLOUTS: Final = "/v1/rollouts"  # POST create (rollouts:write), GET list (fleet:read)
ROLLOUT: Final = "/v1/rollouts/{rollout_id}"  # GET status with per-device rows
# POST pause|resume|abort|approve (rollouts:write)
ROLLOUT_ACTION: Final = "/v1/rollouts/{rollout_id}/{action}"
ENROLL: Final = (
    "/v1/enroll"  # a device exchanges a claim for its identity (lepton.protocol.enrolment)
)
CLAIMS: Final = "/v1/claims"  # enrolment claims (scope devices:write)
CLAIM: Final = "/v1/claims/{name}"  # DELETE: revoke a claim (scope devices:write)
DEVICE_REVOKE: Final = "/v1/devices/{device_id}/revoke"  # (scope devices:write)
METRICS: Final = "/metrics"


#: The header a device sends its update slot's credential in (``Authorization`` carries the
#: device's own token).
UPLOAD_TOKEN_HEADER: Final = "X-Lepton-Upload-Token"  # noqa: S105 - a header name


def path(template: str, **values: str | int) -> str:
    """``template`` with each ``{name}`` replaced by its quoted value (``KeyError`` for a
    placeholder without one)."""
    return template.format_map({k: quote(str(v), safe="") for k, v in values.items()})
