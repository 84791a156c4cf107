"""`genloop bench` (being written)."""

from __future__ import annotations


def register(commands) -> None:
    commands.add_parser("bench", help="(not yet available)")
