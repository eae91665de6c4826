"""Routing analysis: capacity sweeps, expert/class specialisation, token maps,
expert load and ablations, with matplotlib figures and a report."""
