"""nemoc.grammar."""
