"""How big a request's jobs are: array tasks, jobs, batches, and the settings stored with it."""

from __future__ import annotations

from typing import Any

from .config import Config
from .scheduler import scheduler_class

__all__ = ["array_size", "batch_size", "job_sizes", "request_settings"]


def array_size(config: Config, n_tasks: int) -> int:
    """How many array tasks to submit for ``n_tasks`` tasks, over one or several jobs.

    More than the cluster's ``max_aj_tasks`` are split into several jobs by
    :func:`job_sizes`, not capped. Without ``workers``, the scheduler's
    ``default_max_workers`` caps it.
    """
    default = scheduler_class(config.scheduler).default_max_workers
    workers = config.workers if config.workers is not None else min(n_tasks, default)
    return max(1, min(workers, n_tasks))


def job_sizes(n_workers: int, per_job: int) -> list[int]:
    """Split ``n_workers`` array tasks into jobs of at most ``per_job`` each (0: one job)."""
    if per_job <= 0 or n_workers <= per_job:
        return [n_workers]
    full, rest = divmod(n_workers, per_job)
    return [per_job] * full + ([rest] if rest else [])


def batch_size(config: Config, n_tasks: int, workers: int) -> int:
    """How many tasks an array task leases at once.

    Enough that tiny tasks do not pay a round trip each, small enough that
    every array task gets a share and a lost worker loses little.
    """
    if config.batch is not None:
        return config.batch
    return max(1, min(64, n_tasks // (workers * 4)))


def request_settings(config: Config, n_tasks: int) -> dict[str, Any]:
    """The settings stored with a request: what the server hands to every worker, and more.

    ``config`` (the config, which holds no secret) lets any process watch the
    request's jobs.
    """
    workers = array_size(config, n_tasks)
    return {
        "config": config.as_dict(),
        "lease_s": float(config.lease_s),
        "heartbeat_s": max(0.5, config.lease_s / 4),
        "task_timeout_s": config.task_timeout_s,
        "batch": batch_size(config, n_tasks, workers),
        "capture_bytes": config.capture_bytes,
        "max_attempts": config.retries + 1,
        "tasks_per_worker": config.tasks_per_worker,
        "workers": workers,
    }
