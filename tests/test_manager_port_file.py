"""`bcmanager --port 0 --port-file PATH`: the manager chooses its port and says which, so a
caller (LocalCluster, `bcorch demo`) never loses a port chosen earlier to another process."""
from __future__ import annotations

import socket
import subprocess

from bcorch.orchestrator import local_cluster
from bcorch.orchestrator.local_cluster import LocalCluster, manager_argv
from bcorch.config_writer import write_config
from support import ManagedProcess, http_json, wait_until


def test_port_zero_is_written_to_the_port_file_once_listening(tmp_path, procs):
    (tmp_path / "in").mkdir()
    cfg = write_config(tmp_path / "m.toml", manager={"settle_s": 0.0})
    port_file = tmp_path / "port"
    proc = ManagedProcess(manager_argv(cfg, "--input-dir", str(tmp_path / "in"),
                                       "--output-dir", str(tmp_path / "out"),
                                       "--db", str(tmp_path / "m.sqlite"),
                                       "--port", "0", "--port-file", str(port_file)),
                          tmp_path / "m.log")
    procs.append(proc)
    proc.start()
    port = wait_until(lambda: port_file.exists() and port_file.read_text(), 30,
                      what=f"the port file\n{proc.log()}")
    assert port.endswith("\n") and int(port) > 0
    assert list(tmp_path.glob("port.*")) == [], "written beside, then renamed"
    code, _ = http_json(f"http://127.0.0.1:{int(port)}/heartbeat")
    assert code == 200


def test_an_unwritable_port_file_is_one_line_and_exit_1(tmp_path):
    (tmp_path / "in").mkdir()
    cfg = write_config(tmp_path / "m.toml", manager={"settle_s": 0.0})
    out = subprocess.run(manager_argv(cfg, "--input-dir", str(tmp_path / "in"),
                                      "--output-dir", str(tmp_path / "out"),
                                      "--db", str(tmp_path / "m.sqlite"), "--port", "0",
                                      "--port-file", str(tmp_path / "no" / "such" / "port")),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(
        "bcmanager: --port-file: cannot write"), out.stderr
    assert "Traceback" not in out.stderr


def test_a_cluster_whose_old_free_port_is_taken_still_starts(tmp_path, monkeypatch):
    """The race of free_port(): the number it returned is taken before the manager binds.
    LocalCluster no longer chooses a number; the manager does, on its own socket."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        monkeypatch.setattr(local_cluster, "free_port", lambda: busy)
        cluster = LocalCluster(tmp_path, gpus=1)
        try:
            cluster.start_manager(timeout=60)
            assert cluster.port != busy
            assert cluster.status() is not None
            assert f"url = \"{cluster.url}\"" in cluster.config.read_text(), \
                "bcorch reads the manager's URL from the config"
            first = cluster.port
            cluster.manager.stop()
            cluster.start_manager(timeout=60)  # a restart keeps the port engines know
            assert cluster.port == first and cluster.status() is not None
        finally:
            cluster.close()
