"""Operator commands: list and replay dead letters, generate the published schemas."""
