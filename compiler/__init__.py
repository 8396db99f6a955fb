"""nemoc.compiler."""
