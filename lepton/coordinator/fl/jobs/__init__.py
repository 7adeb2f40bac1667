"""Federated jobs from spec to final model: the job file (spec), admission of its code, the
engine on the leader, one runner per job with its round opening and closing, round progress
and device planning."""
