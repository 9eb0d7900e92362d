"""The one way secrets leave a string: replaced by a mask, longest first.

API keys (``api_client.py``), credentials inside storage URIs (``storage.py``) and the job's environment
(``submit.py``) all pass through :func:`redact`; longest first, so that a secret that contains
another is masked whole rather than leaving its remainder in view.
"""

from __future__ import annotations

from collections.abc import Iterable

MASK = "***"


def redact(text: str, secrets: Iterable[str], mask: str = MASK) -> str:
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, mask)
    return text
