"""Tasks as the coordinator's API, CLI and store all speak of them (light: the CLI imports it)."""
