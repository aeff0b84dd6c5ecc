"""Detection stages, each usable on its own as a library."""
