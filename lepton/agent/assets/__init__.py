"""Small files shipped with the agent (probe models). Loaded through ``importlib.resources``."""
