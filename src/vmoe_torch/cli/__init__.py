"""Command-line interface (argument parsing only; the work lives elsewhere)."""
