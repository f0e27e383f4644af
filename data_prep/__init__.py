"""Offline data preparation commands (IVCR-200K JSON + videos -> stores; the toy corpus)."""
