"""Quantum Trader permit chain: Apply (P3), Governor (P3.2), P3.3 Position State Brain, and an exchange layer."""

__version__ = "0.1.0"
