"""Prometheus metrics of authentication, on the coordinator's own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class AuthMetrics:
    """Requests let through by caller kind, refusals by reason, audit records suppressed."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.allowed = Counter(
            "lepton_auth_allowed",
            "Requests authenticated and authorised, by caller kind (operator, device)",
            ["kind"],
            registry=registry,
        )
        self.refusals = Counter(
            "lepton_auth_refusals",
            "Requests refused by authentication or authorisation, by reason",
            ["reason"],
            registry=registry,
        )
        self.enrolments = Counter(
            "lepton_enrolments",
            "Devices enrolled (a claim exchanged for an identity)",
            registry=registry,
        )
        self.audit_suppressed = Counter(
            "lepton_audit_suppressed",
            "Refusals not written to the audit log one by one (a flood from one address)",
            registry=registry,
        )
