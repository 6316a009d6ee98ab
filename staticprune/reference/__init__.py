"""Eager, dynamic, paper-faithful method implementations: the oracle for parity. Never exported."""
