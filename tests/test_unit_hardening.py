"""In-process unit tests of failure paths that must never report an outcome that did not
happen (fakes stand in for Docker only here)."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import docker
import docker.errors
import pytest

import sqlrs_engine as se

pytestmark = pytest.mark.unit


def test_config_values_are_copies(tmp_path: Path) -> None:
    config = se.ConfigManager(str(tmp_path / "config.json"))
    capacity = config.value("cache.capacity")
    capacity["maxBytes"] = 99
    config.effective()["log"]["level"] = "error"
    assert config.value("cache.capacity.maxBytes") == 0
    assert config.value("log.level") == "debug"
    assert se.CONFIG_DEFAULTS["cache"]["capacity"]["maxBytes"] == 0


class FakeContainer:
    def __init__(self, key: str, fail: bool) -> None:
        self.id = f"{key}-container"
        self.labels = {se.LABEL_KEY: key}
        self.fail = fail

    def remove(self, force: bool) -> None:
        if self.fail:
            raise docker.errors.APIError("removal refused")


class FakeDocker(se.DockerRuntime):
    def __init__(self, containers: list[FakeContainer]) -> None:
        super().__init__("label")
        self.containers = containers

    def _labelled(self, labels: Any) -> list[Any]:
        return list(self.containers)


def test_sweep_reports_only_containers_really_removed(caplog: pytest.LogCaptureFixture) -> None:
    runtime = FakeDocker([FakeContainer("kept", False), FakeContainer("gone", False),
                          FakeContainer("stuck", True)])
    with caplog.at_level(logging.WARNING, logger="sqlrs-engine"):
        removed = runtime.sweep({"kept"})
    assert removed == ["gone-container"]
    assert "cannot remove container stuck-cont" in caplog.text


class RunningForever:
    def __init__(self) -> None:
        self.killed = False

    def exec_inspect(self, exec_id: str) -> dict[str, Any]:
        return {"Running": True, "ExitCode": None, "Pid": 0}


def test_docker_client_still_running_is_not_a_success() -> None:
    def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    ours, theirs = socket.socketpair()
    with ours, theirs:
        client = se.DockerClient(call, RunningForever(), "e" * 64, ours, None)
        client.linger_seconds = 0.05
        with pytest.raises(se.DbmsError, match="kept running"):
            client.wait()


class FailingDeletion:
    def delete_instance(self, instance_id: str, force: bool, dry_run: bool) -> Any:
        raise se.RuntimeUnavailable("connection refused")


class OneExpired:
    def list_instances(self) -> list[Any]:
        return [se.InstanceRow(instance_id="a" * 32, state_id="b" * 64, image_id="x",
                               created_at=se.format_ts(0), expires_at=se.format_ts(1),
                               runtime_id=None, runtime_dir=None, status="active", port=None,
                               job_id=None, name=None)]


def test_reaper_logs_what_it_could_not_reap(caplog: pytest.LogCaptureFixture) -> None:
    reaper = se.Reaper(OneExpired(), FailingDeletion())  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="sqlrs-engine"):
        assert reaper.sweep() == []
    assert f"cannot remove expired instance {'a' * 32}" in caplog.text
    assert "connection refused" in caplog.text


class BrokenInstances:
    def discard(self, handle: Any) -> None:
        raise OSError("device busy")


def test_a_runtime_that_cannot_be_discarded_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    run = se.JobRun("j" * 32)
    handle = se.RuntimeHandle(key="k" * 32, image=None, runtime=None,  # type: ignore[arg-type]
                              runtime_dir="/nonexistent", data_dir="/nonexistent",
                              socket_dir="/nonexistent")
    with caplog.at_level(logging.ERROR, logger="sqlrs-engine"):
        se.discard_quietly(BrokenInstances(), run, handle)  # type: ignore[arg-type]
    assert f"cannot discard its runtime {'k' * 32}" in caplog.text
    assert "device busy" in caplog.text


@pytest.mark.parametrize(("error", "status"), [
    (docker.errors.DockerException("no socket"), 503), (ValueError("bad TLS config"), 502)])
def test_docker_client_failures_are_told_apart(monkeypatch: pytest.MonkeyPatch,
                                               error: Exception, status: int) -> None:
    def refuse(**_kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(docker, "DockerClient", refuse)
    with pytest.raises(se.ApiError) as info:
        se.DockerRuntime("label").docker()
    assert info.value.status == status
    assert str(error) in str(info.value.details)


class FailingAgent:
    """A container's command agent whose commands all fail."""

    container_id = "c" * 64
    user = "100:102"
    broken = False

    def run(self, command: list[str]) -> tuple[int, str]:
        return 1, "tail: cannot open"

    def idle_and_alive(self) -> bool:
        return not self.broken

    def close(self) -> None:
        self.broken = True


def test_a_failing_exec_is_an_error_or_logged(caplog: pytest.LogCaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = se.DockerRuntime("label")
    monkeypatch.setattr(runtime.agents, "new", lambda container_id, user: FailingAgent())
    container = SimpleNamespace(id=FailingAgent.container_id)
    image = se.ResolvedImage("img", "img@sha256:0", "docker", "img", owner=(100, 102))
    with pytest.raises(se.DbmsError, match="cannot open"):
        runtime._exec(container, image, ["pg_ctl", "stop"])
    with caplog.at_level(logging.WARNING, logger="sqlrs-engine"):
        assert runtime._exec(container, image, ["tail", "x"], check=False) \
            == "tail: cannot open"
    assert "docker exec tail exited 1" in caplog.text
