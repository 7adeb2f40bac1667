"""Who may talk to the coordinator and its broker: the fleet's PKI, operator tokens,
enrolment and broker accounts, one module each."""
