"""Worker pools behind one Protocol: local subprocesses over pipes (default)."""
