"""nemoc.runtime."""
