"""Unit tests of the paramiko side's socket settings (the SSH sessions are tested end to end)."""

from __future__ import annotations

import socket

from sheepdog.remote import _no_delay


def test_the_ssh_connection_sends_each_packet_at_once() -> None:
    """TCP_NODELAY: through the tunnel, an answer's second packet must not wait for an ACK."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with socket.create_connection(listener.getsockname()) as sock:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
            _no_delay(sock)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_a_proxy_command_or_unix_socket_is_left_alone() -> None:
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        _no_delay(left)  # no TCP options on a Unix socket: nothing raised
    _no_delay(object())  # paramiko.ProxyCommand is no socket
