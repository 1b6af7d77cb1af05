"""Declarative cases: one module per claim, each exposing CASES."""
