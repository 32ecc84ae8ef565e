#!/usr/bin/env python3
"""An SSH_ASKPASS program for the tests: answers the one-time code prompt with the current
TOTP (RFC 6238: HMAC-SHA1, 30 s steps, 6 digits) of the test's secret, and counts each time
it is asked. Standard library only.

ssh runs it with the prompt as its one argument and reads the answer from its stdout. The
environment names files, never the secret itself:

- ``SHEEPDOG_TEST_TOTP_SECRET_FILE``: the base32 secret on its first line (0600);
- ``SHEEPDOG_TEST_TOTP_COUNT_FILE``: one line is appended per prompt (the prompt's text);
- ``SHEEPDOG_TEST_TOTP_WRONG=1``: answer a wrong code (the right one plus one, mod 10**6).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
import sys
import time

STEP_S = 30
DIGITS = 6


def totp(secret_b32: str, at: float | None = None) -> str:
    """The code for ``secret_b32`` at time ``at`` (now by default)."""
    key = base64.b32decode(secret_b32.strip().upper() + "=" * (-len(secret_b32.strip()) % 8))
    counter = int((time.time() if at is None else at) // STEP_S)
    digest = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    number = struct.unpack(">I", digest[offset:offset + 4])[0] & 0x7FFFFFFF
    return str(number % 10**DIGITS).zfill(DIGITS)


def main() -> int:
    prompt = sys.argv[1] if len(sys.argv) > 1 else ""
    with open(os.environ["SHEEPDOG_TEST_TOTP_COUNT_FILE"], "a", encoding="utf-8") as count:
        count.write(prompt.replace("\n", " ").strip() + "\n")
    with open(os.environ["SHEEPDOG_TEST_TOTP_SECRET_FILE"], encoding="utf-8") as fh:
        secret = fh.readline().strip()
    code = totp(secret)
    if os.environ.get("SHEEPDOG_TEST_TOTP_WRONG") == "1":
        code = str((int(code) + 1) % 10**DIGITS).zfill(DIGITS)
    print(code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
