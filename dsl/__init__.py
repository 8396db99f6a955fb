"""nemoc.dsl."""
