"""Data: IVCR-200K records, answer parsing, tokenisation, prompts and the toy corpus."""
