"""API keys for the prediction routes (`serve.api_keys_file`, or $LOOPLINE_API_KEYS first).

Each key has an id: `id:key`, one per line (or separated by commas in the environment
variable); blank lines and lines starting with # are skipped. A request presents the key as
`Authorization: Bearer <key>` or `X-API-Key: <key>`; the service answers 401 without a
known one, and logs the key's id (never the key) beside each prediction, so monitoring can
tell callers apart. The keys are held as SHA-256 digests: the process keeps no key itself.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pipelines.core.config import Params
from pipelines.core.errors import LooplineError

ENV = "LOOPLINE_API_KEYS"
KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
MIN_KEY_CHARS = 16


@dataclass(frozen=True)
class ApiKeys:
    digests: dict[bytes, str]  # SHA-256 of a key -> its id

    @property
    def ids(self) -> list[str]:
        return sorted(self.digests.values())

    def caller(self, authorization: bytes | None, api_key: bytes | None) -> str | None:
        """The id of the key a request presents (None: no key, or not one of these)."""
        given = api_key
        if given is None and authorization is not None and authorization[:7].lower() == b"bearer ":
            given = authorization[7:]
        if not given:
            return None
        digest = hashlib.sha256(given.strip()).digest()
        for known, key_id in self.digests.items():  # every digest compared, in constant time each
            if hmac.compare_digest(known, digest):
                return key_id
        return None


def load_api_keys(params: Params) -> ApiKeys | None:
    """The service's keys: $LOOPLINE_API_KEYS, else serve.api_keys_file, else None (open).
    A malformed entry is refused naming its place, never its key."""
    text, where = os.environ.get(ENV), f"${ENV}"
    if not text and params.serve.api_keys_file:
        path = Path(params.serve.api_keys_file)
        try:
            text, where = path.read_text(encoding="utf-8"), str(path)
        except OSError as err:
            raise LooplineError("serve", f"serve.api_keys_file {path}: cannot be read ({err.strerror})") from None
    if not text:
        return None
    digests: dict[bytes, str] = {}
    entries = [e.strip() for line in text.splitlines() for e in line.split(",")]
    for number, entry in enumerate((e for e in entries if e and not e.startswith("#")), start=1):
        key_id, sep, key = entry.partition(":")
        if not sep or not KEY_ID.fullmatch(key_id.strip()):
            raise LooplineError(
                "serve", f"{where}: entry {number} is not `id:key` with an id of 1-64 A-Z a-z 0-9 . _ -"
            )
        if len(key.strip()) < MIN_KEY_CHARS:
            raise LooplineError(
                "serve", f"{where}: the key of {key_id.strip()!r} is shorter than {MIN_KEY_CHARS} characters"
            )
        digest = hashlib.sha256(key.strip().encode()).digest()
        if digest in digests or key_id.strip() in digests.values():
            raise LooplineError("serve", f"{where}: {key_id.strip()!r} (or its key) is given twice")
        digests[digest] = key_id.strip()
    return ApiKeys(digests) if digests else None
