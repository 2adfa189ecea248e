"""The upstream source of the features asset: a JSON-lines file of support tickets."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from aiplane.core.artifacts import atomic_write_text
from aiplane.core.errors import InputError
from aiplane.core.sample import generate_tickets

__all__ = ["load_tickets", "seed_tickets", "TICKET_FIELDS"]

TICKET_FIELDS = ("ticket_id", "region", "subject", "body", "category", "priority")


def seed_tickets(path: Path, n: int = 3000, seed: int = 7) -> Path:
    """Write the deterministic sample tickets to ``path`` (atomically)."""
    atomic_write_text(path, "".join(json.dumps(t, sort_keys=True) + "\n" for t in generate_tickets(n, seed)))
    return path


def load_tickets(path: Path, seed_if_missing: bool = False, log: Callable[[str], None] = print) -> list[dict]:
    """Read and validate the tickets file; every row must have every field, non-empty."""
    if not path.exists():
        if not seed_if_missing:
            raise InputError(f"Ticket source {str(path)!r} does not exist; give an existing JSON-lines file.")
        seed_tickets(path)
        log(f"seeded {path} with the deterministic sample tickets")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{path}:{n}: not valid JSON ({exc})") from None
        missing = [f for f in TICKET_FIELDS if not row.get(f)]
        if missing:
            raise InputError(f"{path}:{n}: ticket is missing {', '.join(missing)}; every ticket needs {', '.join(TICKET_FIELDS)}")
        rows.append(row)
    if not rows:
        raise InputError(
            f"Ticket source {str(path)!r} has no tickets: it is empty. Add JSON lines with "
            f"{', '.join(TICKET_FIELDS)}, or remove the file to have the sample tickets seeded."
        )
    return rows
