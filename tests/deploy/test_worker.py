"""The rank worker's start-up: forked ranks connect only once every rank of the node was forked."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("torch")

from cachefit.deploy.supervisor import write_pid  # noqa: E402
from cachefit.deploy.worker import wait_for_forks  # noqa: E402
from cachefit.errors import DeployError  # noqa: E402


def test_returns_once_every_rank_wrote_its_pid(tmp_path, hang_guard):
    for rank in range(3):
        write_pid(tmp_path, rank)
    with hang_guard():
        wait_for_forks(tmp_path, 3, timeout_s=60)


def test_waits_for_a_rank_forked_later(tmp_path, hang_guard):
    write_pid(tmp_path, 0)
    late = threading.Timer(0.2, write_pid, args=(tmp_path, 1))
    late.start()
    with hang_guard():
        wait_for_forks(tmp_path, 2, timeout_s=120)
    late.join()
    assert (tmp_path / "pid-rank1.json").exists()


def test_a_rank_that_never_started_is_named(tmp_path):
    write_pid(tmp_path, 0)
    write_pid(tmp_path, 2)
    with pytest.raises(DeployError, match=r"rank\(s\) 1, 3 did not start within --startup-timeout"):
        wait_for_forks(tmp_path, 4, timeout_s=0.05)
