"""Who may do what: operator tokens and their scopes, device identities and enrolment, the
broker accounts and certificates devices get, and the audit log (docs/security.md)."""
