"""What `sheepdog serve` does for requests whose workers use the tunnel (no cluster here).

The SSH side (the forward, the relay, the address file written over SFTP) stands in
as ``publish_address`` and ``tunnel.is_up``; tests/e2e/test_tunnel_sleep_e2e.py runs
the real thing on a cluster whose nodes cannot reach this machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sheepdog import Config, stored_request, tunnel, tunnel_keeper, worker_address
from sheepdog.cli import main
from sheepdog.errors import SSHError
from sheepdog.serialisation import serialise_args, serialise_function, serialise_value
from sheepdog.sizing import request_settings
from sheepdog.storage import Storage
from sheepdog.stored_request import RequestJobs, StoredRequest


def double(x: int) -> int:
    return 2 * x


class FakeScheduler:
    """Stands in for an SSH scheduler: its host is the key tunnels are kept by."""

    def __init__(self) -> None:
        self.host = object()
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakeServer:
    port = 4321


def _request(storage: Storage, connect: str, *, stored: bool = True) -> int:
    cfg = Config.from_mapping({"host": "headnode", "dbfile": storage.dbfile, "connect": connect})
    rid = storage.new_request(serialise_function(double), b"", serialise_args([1, 2]),
                              settings=request_settings(cfg, 2) if stored else None)
    storage.add_job(rid, "7", 2, info={"url": "http://head:999/", "port": FakeServer.port,
                                       "listen_address": "127.0.0.1",
                                       "connect": connect})
    return rid


@pytest.fixture
def ssh(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The tunnel's state and what was published, as an SSH connection would leave them."""
    state: dict[str, Any] = {"up": False, "published": [], "fail": None, "schedulers": []}

    def open_scheduler(config: Config) -> FakeScheduler:
        scheduler = FakeScheduler()
        state["schedulers"].append(scheduler)
        return scheduler

    def publish(jobs: RequestJobs, mode: str) -> tuple[str, int]:
        if state["fail"] is not None:
            raise state["fail"]
        state["published"].append((jobs.request_id, mode, jobs.running_server().port))
        state["up"] = True
        return ("head", 40000 + len(state["published"]))

    monkeypatch.setattr(stored_request, "open_scheduler", open_scheduler)
    monkeypatch.setattr(worker_address, "publish_address", publish)
    monkeypatch.setattr(tunnel, "is_up", lambda host, port: state["up"])
    return state


def test_uses_tunnel_reads_the_latest_jobs(tmp_path: Path) -> None:
    with Storage(str(tmp_path / "s.sqlite")) as storage:
        def uses_tunnel(rid: int) -> bool:
            return StoredRequest(storage, rid).uses_tunnel()

        assert uses_tunnel(_request(storage, "tunnel"))
        assert not uses_tunnel(_request(storage, "direct"))
        rid = storage.new_request(serialise_function(double), b"", serialise_args([1]))
        assert not uses_tunnel(rid)  # never submitted


def test_the_keeper_starts_a_tunnel_publishes_it_and_starts_it_again(
    tmp_path: Path, ssh: dict[str, Any]
) -> None:
    said: list[str] = []
    now = [0.0]
    with Storage(str(tmp_path / "s.sqlite")) as storage:
        tunnelled, direct = _request(storage, "tunnel"), _request(storage, "direct")
        keeper = tunnel_keeper.TunnelKeeper(storage, said.append, clock=lambda: now[0])
        assert keeper.add(tunnelled, FakeServer())  # type: ignore[arg-type]
        assert not keeper.add(direct, FakeServer())  # type: ignore[arg-type]
        assert ssh["published"] == [(tunnelled, "tunnel", FakeServer.port)]
        assert said == [f"request {tunnelled}: the tunnel is up; its workers find the relay "
                        "at head:40001"]
        keeper.keep()  # up: nothing to do
        assert len(ssh["published"]) == 1 and len(said) == 1
        # The connection drops; the head node does not answer at first.
        ssh["up"], ssh["fail"] = False, SSHError("connection refused", host="headnode")
        keeper.keep()
        keeper.keep()  # tried again only after RETRY_S
        assert said[1:] == [f"request {tunnelled}: the tunnel is down and could not start: "
                            "connection refused; retrying"]
        ssh["fail"] = None
        keeper.keep()
        assert len(ssh["published"]) == 1
        now[0] += tunnel_keeper.RETRY_S
        keeper.keep()
        assert said[2:] == [f"request {tunnelled}: the tunnel is up; its workers find the "
                            "relay at head:40002"]
        keeper.close()
    assert [s.closed for s in ssh["schedulers"]] == [True]  # the relay sees EOF and exits


def test_a_tunnel_request_without_a_stored_config_says_how_to_reach_it(
    tmp_path: Path, ssh: dict[str, Any]
) -> None:
    said: list[str] = []
    with Storage(str(tmp_path / "s.sqlite")) as storage:
        rid = _request(storage, "tunnel", stored=False)
        assert tunnel_keeper.TunnelKeeper(storage, said.append).add(
            rid, FakeServer())  # type: ignore[arg-type]
    assert ssh["published"] == []
    assert len(said) == 1 and f"sheepdog attach {rid} --config FILE" in said[0], said


def test_serve_brings_a_requests_tunnel_up_and_closes_it_when_done(
    tmp_path: Path, ssh: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dbfile = str(tmp_path / "s.sqlite")
    with Storage(dbfile) as storage:
        rid = _request(storage, "tunnel")

    class Served:
        def __init__(self, port: int, *args: Any, **options: Any) -> None:
            self.port = port

        def ensure_running(self) -> bool:
            # One pass of serve's loop: the workers finish the request.
            with Storage(dbfile) as storage:
                storage.complete(rid, [{"index": i, "ok": True, "value": serialise_value(0)}
                                       for i in (1, 2)])
            return False

        def stop(self) -> None:
            pass

    monkeypatch.setattr("sheepdog.server.Server", Served)
    monkeypatch.setattr("sheepdog.cli._delete_leftovers", lambda storage, rid: None)
    assert main(["serve", "--dbfile", dbfile, "--timeout", "60"]) == 0
    out = capsys.readouterr().out
    assert f"request {rid}: the tunnel is up; its workers find the relay at head:40001" in out
    assert "every served request is finished" in out
    assert ssh["published"] == [(rid, "tunnel", FakeServer.port)]
    assert [s.closed for s in ssh["schedulers"]] == [True]
