"""Small helpers shared by every layer of the package (no model knowledge)."""
