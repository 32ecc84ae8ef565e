"""What the worker stub's exit statuses mean, for every scheduler's failure messages."""

from __future__ import annotations

from ..stubfile import load_stub

__all__ = ["stub_exit_reasons"]


def stub_exit_reasons() -> dict[int, str]:
    """What the worker stub's exit statuses mean (they are defined in the stub itself)."""
    stub = load_stub()
    return {
        stub.EXIT_PROTOCOL: "it could not talk to the server (see the job's .e file)",
        stub.EXIT_AUTH: "the server and the worker did not accept each other's signatures",
        stub.EXIT_VERSION: "the function cannot be loaded on that node's Python",
        stub.EXIT_STUCK: "a task overran task_timeout_s where it could not be interrupted",
        stub.EXIT_SECRET: (
            "it cannot read the request's secret file, which sheepdog writes beside the job "
            "file in ssh_dir on the head node: the execution nodes must see ssh_dir at the "
            "same path (a shared file system); see the job's .e file"
        ),
        stub.EXIT_SPOOLED: (
            "it could not reach the server for its retry time (worker_retry_s) and wrote its "
            "finished results to the request's spool beside the job file; sheepdog collects "
            "them when it is back (the same map, or `sheepdog attach`)"
        ),
    }
