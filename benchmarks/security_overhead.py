"""The cost of signing and of TLS, in round trips per second against the real gunicorn server.

One keep-alive connection makes signed calls in a loop, as the worker stub
does (its own ``Connection``: the call signed, the answer's signature
checked), against an HTTP server and an HTTPS server with a pinned
certificate, both running at the same time on the same database. Two calls:
``heartbeat`` with an empty body (the protocol's smallest round trip), and a
``results`` post carrying a 1 MiB pickled value (a duplicate after the first,
so no write). "HTTP without signing" cannot be run (the server refuses
unsigned calls), so it is estimated: the time of the four HMAC operations of
one round trip (worker signs, server checks, server signs, worker checks),
measured alone on the same bodies, is taken off each HTTP round trip.

    python -m benchmarks.security_overhead [--seconds S]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._report import machine, print_table, write_json
from sheepdog.server import Server
from sheepdog.server.auth import (
    SIGNATURE_HEADER,
    new_nonce,
    sign_request,
    sign_response,
    signed_headers,
    verify,
)
from sheepdog.server.tls import certificate_for
from sheepdog.storage import Storage

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "worker_stub"))
from sheepdog_worker import Connection  # noqa: E402

ROUNDS = 5


def calls(rid: int) -> dict[str, tuple[str, str, dict[str, Any]]]:
    value = base64.b64encode(pickle.dumps(b"\x00" * (1 << 20))).decode()
    result = {"index": 1, "lease": "", "ok": True, "value": value, "stdout": "", "stderr": "",
              "duration_s": 0.0}
    return {
        "heartbeat (empty)": ("POST", "heartbeat", {"worker": "bench", "leases": []}),
        "results (1 MiB)": ("POST", "results", {"worker": "bench", "host": "bench",
                                                "max_tasks": 0, "results": [result]}),
    }


def rate(conn: Connection, method: str, name: str, body: dict[str, Any], seconds: float) -> float:
    """Round trips per second over ``seconds``, after a warm-up call."""
    conn.call(method, name, body)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        conn.call(method, name, body)
        n += 1
    return n / (time.perf_counter() - start)


def hmac_cost_s(body: bytes, answer: bytes, secret: str, seconds: float) -> float:
    """Seconds for the four HMAC operations of one round trip on these bodies."""
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        path = "/api/v1/requests/1/x"
        signature = signed_headers(secret, "POST", path, body)[SIGNATURE_HEADER]
        # The server hashes the body as it reads it, then checks the headers' signature.
        digest = hashlib.sha256(body).hexdigest()
        verify(sign_request(secret, "POST", path, "0", new_nonce(), len(body), digest), signature)
        reply = sign_response(secret, signature, answer)
        verify(sign_response(secret, signature, answer), reply)
        n += 1
    return (time.perf_counter() - start) / n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="per protocol and call, in alternating windows (default 10)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sheepdog-bench-") as tmp:
        dbfile = str(Path(tmp) / "bench.sqlite")
        with Storage(dbfile) as db:
            rid = db.new_request(b"F", None, [pickle.dumps(1)], settings={"lease_s": 60.0})
            secret = db.get_secret(rid)
        tls = certificate_for(dbfile)
        plain = Server(None, None, dbfile, host="127.0.0.1", workers=1, threads=2)
        https = Server(None, None, dbfile, host="127.0.0.1", workers=1, threads=2,
                       certfile=tls.certfile, keyfile=tls.keyfile)
        rows, figures = [], {}
        try:
            for label, (method, name, body) in calls(rid).items():
                http_conn = Connection(plain.url_for("127.0.0.1"), secret, rid, retry_s=5.0)
                tls_conn = Connection(https.url_for("127.0.0.1"), secret, rid, retry_s=5.0,
                                      tls_fingerprint=tls.fingerprint)
                raw = json.dumps(body).encode()
                answer = json.dumps({"accepted": [], "duplicates": [1]}).encode()
                cost = hmac_cost_s(raw, answer, secret, args.seconds / 2)
                # Alternating short windows, medians: a busy machine then hurts both alike.
                window = args.seconds / ROUNDS
                http_rates, tls_rates = [], []
                for _ in range(ROUNDS):
                    http_rates.append(rate(http_conn, method, name, body, window))
                    tls_rates.append(rate(tls_conn, method, name, body, window))
                http_rate, tls_rate = statistics.median(http_rates), statistics.median(tls_rates)
                http_conn.close()
                tls_conn.close()
                unsigned = 1 / max(1 / http_rate - cost, 1e-9)
                rows.append([label, f"{unsigned:,.0f}", f"{http_rate:,.0f}", f"{tls_rate:,.0f}",
                             f"{cost * 1e6:,.0f}",
                             f"{100 * (1 - http_rate / unsigned):.1f}%",
                             f"{100 * (1 - tls_rate / http_rate):.1f}%"])
                figures[label] = {"http_unsigned_estimated_per_s": unsigned,
                                  "http_hmac_per_s": http_rate, "https_hmac_per_s": tls_rate,
                                  "hmac_cost_us": cost * 1e6, "body_bytes": len(raw)}
        finally:
            plain.stop()
            https.stop()
    print_table(
        "Round trips per second, one keep-alive connection (gunicorn, 1 worker, 2 threads)",
        ["call", "HTTP unsigned (est.)", "HTTP+HMAC", "HTTPS+HMAC", "4 HMACs (us)",
         "signing cost", "TLS cost"],
        rows,
    )
    write_json("security_overhead", {"machine": machine(), "seconds": args.seconds,
                                     "rounds": ROUNDS, "results": figures})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
