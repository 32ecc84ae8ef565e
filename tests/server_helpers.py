"""The worker API's client side, for tests through Flask's test client.

Tests of the server (tests/server/) and of what rides on it (blobs, the environment
report) call the API the way a worker does: signed, with every 2xx answer's signature checked.
"""

from __future__ import annotations

import json
from typing import Any

from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from sheepdog.server.auth import SIGNATURE_HEADER, sign_response, signed_headers

__all__ = ["Api", "error_of", "lease_body"]


class Api:
    """A signed client for one request, checking every 2xx answer's signature."""

    def __init__(self, client: FlaskClient, request_id: int, secret: str) -> None:
        self.client = client
        self.rid = request_id
        self.secret = secret

    def path(self, action: str) -> str:
        return f"/api/v1/requests/{self.rid}/{action}"

    def call(
        self,
        method: str,
        action: str,
        body: bytes | dict[str, Any] = b"",
        *,
        secret: str | None = None,
        time_s: int | None = None,
        path: str | None = None,
        headers: dict[str, str] | None = None,
        nonce: str | None = None,
    ) -> TestResponse:
        raw = json.dumps(body).encode() if isinstance(body, dict) else body
        path = path or self.path(action)
        sent = signed_headers(
            secret or self.secret, method, path, raw, time_s=time_s, nonce=nonce
        )
        signature = sent[SIGNATURE_HEADER]
        sent.update(headers or {})
        response = self.client.open(path, method=method, data=raw, headers=sent)
        if 200 <= response.status_code < 300:
            expected = sign_response(self.secret, signature, response.get_data())
            assert response.headers[SIGNATURE_HEADER] == expected
        return response


def error_of(response: TestResponse, status: int) -> dict[str, str]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert isinstance(body, dict) and set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"} and body["error"]["message"]
    return dict(body["error"])


def lease_body(max_tasks: int = 1) -> dict[str, Any]:
    return {"worker": "w1", "host": "node1", "max_tasks": max_tasks}
