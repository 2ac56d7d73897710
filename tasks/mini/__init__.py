"""Vendored mini datasets and checkpoints for the offline CI suite (see README.md)."""
