"""Deployer's connection handling, with stand-ins for paramiko's client (no SSH server)."""

from __future__ import annotations

from typing import Any

import paramiko
import pytest

from sheepdog.deployment import Deployer
from sheepdog.errors import SSHError


class FakeChannel:
    def __init__(self, fail: bool) -> None:
        self.fail, self.closed = fail, False

    def settimeout(self, timeout_s: float) -> None:
        pass

    def exec_command(self, command: str) -> None:
        if self.fail:
            raise paramiko.SSHException("connection reset by peer")

    def close(self) -> None:
        self.closed = True


class FakeTransport:
    def __init__(self, active: bool, fail: bool) -> None:
        self.active, self.fail = active, fail

    def is_active(self) -> bool:
        return self.active

    def open_session(self, timeout: float | None = None) -> FakeChannel:
        return FakeChannel(self.fail)


class FakeClient:
    """Records whether it was closed, and whether the Deployer held its lock then."""

    def __init__(self, deployer: Deployer, *, active: bool = True, fail: bool = False) -> None:
        self.deployer = deployer
        self.transport = FakeTransport(active, fail)
        self.closed_under_lock: list[bool] = []

    def get_transport(self) -> FakeTransport:
        return self.transport

    def close(self) -> None:
        self.closed_under_lock.append(self.deployer._lock._is_owned())  # type: ignore[attr-defined]


@pytest.fixture
def deployer(monkeypatch: pytest.MonkeyPatch) -> Deployer:
    d = Deployer("headnode")
    opened: list[Any] = []

    def fresh() -> FakeClient:
        client = FakeClient(d)
        opened.append(client)
        return client

    monkeypatch.setattr(d, "_open", fresh)
    return d


def test_a_dead_connection_is_closed_under_the_lock_before_reconnecting(deployer: Deployer) -> None:
    dead = FakeClient(deployer, active=False)
    deployer._client = dead  # type: ignore[assignment]
    new = deployer.connect()
    assert new is not dead
    # Before, the dead client was dropped unclosed: its socket and reader thread stayed.
    assert dead.closed_under_lock == [True]


def test_a_connection_that_fails_mid_command_is_closed_under_the_lock(deployer: Deployer) -> None:
    broken = FakeClient(deployer, fail=True)
    deployer._client = broken  # type: ignore[assignment]
    with pytest.raises(SSHError, match="connection reset"):
        deployer.run("true")
    assert broken.closed_under_lock == [True]
    assert deployer._client is None
    assert deployer.connect() is not broken
