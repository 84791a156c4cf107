"""Connecting to Ray: a local Ray for one run, or an existing cluster."""
