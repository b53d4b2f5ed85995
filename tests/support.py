"""Helpers shared by the tests: free ports, bounded waits, real processes that always stop."""
from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterable

from bcorch.config_writer import write_config
from bcorch.orchestrator.local_cluster import (LocalProcess, kill_tree, manager_argv, wait_for,
                                               wait_gone)

__all__ = ["REPO", "ManagedProcess", "ManagerProcess", "ServingProcess", "free_port", "http_json",
           "kill_tree", "wait_gone", "wait_until"]

REPO = Path(__file__).resolve().parent.parent


class FakeClock:
    """A clock the test moves by hand (`clock.now += 5`), for classes that take one."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], object], timeout: float = 30.0, interval: float = 0.05,
               what: str = "condition") -> object:
    """Poll condition until it returns something truthy; fail the test after timeout."""
    try:
        return wait_for(condition, timeout, what, interval)
    except TimeoutError as exc:
        raise AssertionError(str(exc)) from None


def http_json(url: str, token: str = "", data: dict | None = None, timeout: float = 10.0):
    """(status, parsed body or text) for a GET (or a POST when data is given)."""
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw, status = resp.read(), resp.status
    except urllib.error.HTTPError as err:
        raw, status = err.read(), err.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


class ManagedProcess(LocalProcess):
    """A real child process (own session, run from the repository) that is killed with its
    tree on close(); the `procs` fixture closes every one a test registers."""

    def __init__(self, argv: list[str], log_path: Path, env: dict | None = None):
        super().__init__(argv, log_path, env=env, cwd=REPO)


class ServingProcess(ManagedProcess):
    """A child process serving HTTP at self.url (bearer self.token, if any); start() waits
    until /heartbeat answers."""

    url: str
    token: str = ""

    def start(self, timeout: float = 30.0):
        super().start()
        wait_until(self._up, timeout, what=f"manager on {self.url}\n{self.log()}")
        return self

    def _up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"manager exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return http_json(self.url + "/heartbeat", timeout=1)[0] == 200
        except OSError:
            return False

    def get(self, route: str, **params):
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return http_json(f"{self.url}{route}{'?' + query if query else ''}", self.token)

    def post(self, route: str, body: dict):
        return http_json(self.url + route, self.token, body)


class ManagerProcess(ServingProcess):
    """`bcmanager` serving a real SQLite file on a free loopback port."""

    def __init__(self, tmp: Path, input_dir: Path, output_dir: Path, *, port: int | None = None,
                 token: str = "", extra: Iterable[str] = (), config: Path | None = None,
                 settle_s: float = 0.0, scan_interval_s: float = 0.2,
                 report_back_interval: float | None = None, batch_size: int | None = None,
                 max_attempts: int | None = None, input_closed: bool = False,
                 allow_simulated: bool = True, request_timeout_s: float | None = None):
        """allow_simulated: the tests' engines run the simulate runner, which a manager
        refuses unless started for simulation (manager.allow_simulated)."""
        self.port = port or free_port()
        self.token = token
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = config
        if cfg is None:
            optional = {"report_back_interval": report_back_interval, "batch_size": batch_size,
                        "max_attempts": max_attempts, "request_timeout_s": request_timeout_s}
            cfg = write_config(tmp / f"manager-{self.port}.toml", manager={
                "settle_s": settle_s, "scan_interval_s": scan_interval_s,
                "allow_simulated": allow_simulated,
                **{k: v for k, v in optional.items() if v is not None}})
        argv = manager_argv(cfg, "--input-dir", str(input_dir), "--output-dir", str(output_dir),
                            "--port", str(self.port), *extra)
        if token:
            argv += ["--token", token]
        if input_closed:
            argv.append("--input-closed")
        super().__init__(argv, tmp / f"manager-{self.port}.log")

    def status(self) -> dict:
        code, body = self.get("/status")
        assert code == 200, body
        return body
