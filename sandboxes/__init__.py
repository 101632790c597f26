"""Sandboxed code execution for code rewards (planned: Docker pool with a local fallback)."""
