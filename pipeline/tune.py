"""`genloop tune` (being written)."""

from __future__ import annotations


def register(commands) -> None:
    commands.add_parser("tune", help="(not yet available)")
