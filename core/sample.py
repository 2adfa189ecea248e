"""A deterministic, realistic fine-tuning set: IT support tickets -> category and priority.

The same seed always gives the same rows, so the set-up, the tokenizer of the
built-in model and the tests agree without shipping a data file.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable

from .placement import normalize_tag

__all__ = ["generate_tickets", "to_features", "CATEGORIES", "PRIORITIES", "REGIONS"]

REGIONS = ("eu", "us", "ap")
PRIORITIES = ("low", "medium", "high", "critical")

# category -> (subjects, details); each phrase is characteristic of its category,
# so a model can learn the mapping and an eval can tell whether it did.
CATEGORIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "network": (
        ("VPN keeps disconnecting", "Wi-Fi drops in meeting room", "Cannot reach intranet", "Slow network on floor"),
        ("the VPN client times out", "packets are lost on the wireless network", "DNS lookups fail", "the switch port blinks amber"),
    ),
    "hardware": (
        ("Laptop will not boot", "Monitor flickers", "Keyboard keys stuck", "Docking station not detected"),
        ("the battery does not charge", "the screen stays black after the logo", "the fan is very loud", "the USB-C dock shows no display"),
    ),
    "access": (
        ("Locked out of account", "Need access to shared drive", "Password reset request", "MFA token lost"),
        (
            "my password expired",
            "I need read access to the finance folder",
            "the authenticator app was reset",
            "my badge does not open the door",
        ),
    ),
    "software": (
        ("Excel crashes on startup", "Install request for IDE", "License expired", "Update failed"),
        (
            "the application freezes when saving",
            "the installer reports error 1603",
            "the licence server is unreachable",
            "the update rolls back after reboot",
        ),
    ),
    "email": (
        ("Mailbox full", "Emails stuck in outbox", "Calendar invites missing", "Spam not filtered"),
        (
            "Outlook says the mailbox is over quota",
            "messages stay in the outbox",
            "meeting invites never arrive",
            "phishing mails reach the inbox",
        ),
    ),
    "security": (
        ("Suspicious login alert", "Malware warning", "Phishing email clicked", "Lost company phone"),
        (
            "an unknown device signed in to my account",
            "the antivirus quarantined a file",
            "I entered my credentials on a fake page",
            "the phone with company data was stolen",
        ),
    ),
}

_URGENCY = {
    "low": ("when someone has time", "no rush", "minor issue"),
    "medium": ("it slows my work", "please look this week", "affects my tasks"),
    "high": ("blocking my work today", "urgent for a customer call", "team cannot work"),
    "critical": ("production is down", "whole office affected", "security incident in progress"),
}


def generate_tickets(n: int = 3000, seed: int = 7) -> list[dict[str, str]]:
    """``n`` tickets with id, region, subject, body, category and priority."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        category = rng.choice(sorted(CATEGORIES))
        subjects, details = CATEGORIES[category]
        priority = rng.choices(PRIORITIES, weights=(3, 4, 2, 1))[0]
        region = rng.choices(REGIONS, weights=(5, 3, 2))[0]
        body = f"Hello, {rng.choice(details)}; {rng.choice(_URGENCY[priority])}."
        rows.append(
            {
                "ticket_id": f"T{seed:02d}-{i:06d}",
                "region": region,
                "subject": rng.choice(subjects),
                "body": body,
                "category": category,
                "priority": priority,
            }
        )
    return rows


def _split(ticket_id: str, eval_fraction: float) -> str:
    bucket = int(hashlib.sha256(ticket_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "eval" if bucket < eval_fraction else "train"


def to_features(tickets: Iterable[dict[str, str]], eval_fraction: float = 0.1) -> list[dict[str, str]]:
    """Tickets as training features: a prompt, the label as completion, residency and split.

    The split is a hash of the ticket id, so a ticket never moves between
    train and eval when the data grows.
    """
    return [
        {
            "id": t["ticket_id"],
            "prompt": f"Ticket: {t['subject']}. {t['body']}\nLabel:",
            "completion": f" {t['category']} {t['priority']}",
            # Normalized on ingest: "EU " and "eu" are one tag, so a typo cannot slip past the policy.
            "residency": normalize_tag(t["region"]),
            "split": _split(t["ticket_id"], eval_fraction),
        }
        for t in tickets
    ]
