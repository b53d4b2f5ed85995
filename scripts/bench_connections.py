"""HTTP servers side by side: throughput, and engines' answers under idle and slowloris connections.

    python scripts/bench.py connections [--servers uvicorn,cheroot,waitress] [--idle 1000]
                                        [--trickle 100] [--attack-seconds 30] [--clients 64]
                                        [--mixed-seconds 10] [--json OUT]

Each server serves the manager's own WSGI app (real SQLite file, leases, metrics).
`uvicorn` is `python -m bcorch.manager` itself; `cheroot` and `waitress` (pip install
'bcorch[bench]') serve the same app from this script (--serve), set up as they would be
in production: 16 worker threads, 120 s idle time-out, 1 MiB bodies; waitress with
connection_limit 5000 (its default of 100 refuses the engines outright).

mixed:  --clients keep-alive clients loop assign (batch 1) -> keepalive -> completed; req/s.
attack: --idle TCP connections that send nothing and --trickle clients that send one header
        byte a second, both opened again whenever the server closes them, for
        --attack-seconds. Meanwhile one engine holds a lease (report_back_interval 10 s)
        and every 0.25 s sends /keepalive, then /assignwork + /completed for a one-file
        batch, on its keep-alive connection (a new one after a failure). An answer that
        takes over 5 s counts as none; the lease is lost when /keepalive says late.
"""
from __future__ import annotations

import argparse
import http.client
import os
import selectors
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from bench_manager import Server, bench_mixed, percentile, request  # noqa: E402
from bench_args import BenchParser, non_negative_int, positive_int  # noqa: E402

NO_ANSWER_S = 5.0
LEASE_S = 10.0
TRICKLE_PREFIX = b"GET /status HTTP/1.1\r\nHost: x\r\nX-Slow: "


class Attackers(threading.Thread):
    """Holds `idle` silent connections and `trickle` slowloris connections open."""

    def __init__(self, port: int, idle: int, trickle: int):
        super().__init__(daemon=True, name="attackers")
        self.port, self.idle, self.trickle = port, idle, trickle
        self.stop = threading.Event()
        self.selector = selectors.DefaultSelector()
        self.closed_by_server = {"idle": 0, "trickle": 0}
        self.connect_failures = 0
        self.opened = threading.Event()

    def _open(self, kind: str) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
        except OSError:
            self.connect_failures += 1
            return
        sock.setblocking(False)
        self.selector.register(sock, selectors.EVENT_READ, [kind, 0])  # kind, bytes sent

    def run(self) -> None:
        for _ in range(self.idle):
            self._open("idle")
        for _ in range(self.trickle):
            self._open("trickle")
        self.opened.set()
        next_byte = time.monotonic()
        while not self.stop.is_set():
            for key, _ in self.selector.select(timeout=0.2):
                sock, kind = key.fileobj, key.data[0]
                try:
                    sock.recv(4096)  # EOF, or an answer (408) that ends the connection
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                self.selector.unregister(sock)
                sock.close()
                self.closed_by_server[kind] += 1
                self._open(kind)
            if time.monotonic() >= next_byte:
                next_byte += 1.0
                for key in list(self.selector.get_map().values()):
                    if key.data[0] == "trickle":
                        sent = key.data[1]
                        key.data[1] += 1
                        try:
                            key.fileobj.send(TRICKLE_PREFIX[sent:sent + 1] or b"a")
                        except OSError:
                            pass  # seen as closed by the select above
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()

    def open_now(self) -> int:
        return len(self.selector.get_map())


class Engine:
    """One engine's requests, each timed; a failure or a slow answer opens a new connection."""

    def __init__(self, port: int):
        self.port = port
        self.conn = self._connect()
        self.latency: dict[str, list[float]] = {"keepalive": [], "assignwork": [], "completed": []}
        self.no_answer = 0

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=NO_ANSWER_S)

    def get(self, route: str, path: str) -> dict | None:
        start = time.perf_counter()
        try:
            code, body = request(self.conn, "GET", path)
        except (OSError, http.client.HTTPException):
            self.latency[route].append(NO_ANSWER_S)
            self.no_answer += 1
            self.conn.close()
            self.conn = self._connect()
            return None
        self.latency[route].append(time.perf_counter() - start)
        if code != 200:
            raise RuntimeError(f"{path}: {code} {body}")
        return body


def bench_attack(kind: str, tmp: Path, idle: int, trickle: int, seconds: float) -> dict:
    from bcorch.manager.store import Store

    server = Server(tmp, f"attack-{kind}", kind=kind, lease_s=LEASE_S)
    store = Store(server.db(), max_attempts=3)
    store.add_files((f"r{i:06d}.pod5", 1000) for i in range(100_000))
    store.close()
    with server:
        engine = Engine(server.port)
        held = engine.get("assignwork", "/assignwork?engineid=holder&batchsize=1")
        assert held and held["batch_size"] == 1, held
        attackers = Attackers(server.port, idle, trickle)
        attackers.start()
        attackers.opened.wait(120)
        open_at_start = attackers.open_now()
        lease_lost = False  # /keepalive said late, or (checked after) the job is gone
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            alive = engine.get("keepalive",
                               f"/keepalive?job_id={held['jobid']}&job_state=PROCESSING")
            lease_lost = lease_lost or bool(alive and alive["late"])
            batch = engine.get("assignwork", "/assignwork?engineid=worker&batchsize=1")
            if batch and batch["batch_size"]:
                engine.get("completed", f"/completed?job_id={batch['jobid']}&job_state=DONE")
            time.sleep(0.25)
        open_at_end = attackers.open_now()
        attackers.stop.set()
        attackers.join(30)
        exit_code = server.proc.poll()  # a server that died under the attack
        if exit_code is None:  # the lease's fate, once the attack is over
            after = Engine(server.port)
            after.conn.timeout = 60
            alive = after.get("keepalive",
                              f"/keepalive?job_id={held['jobid']}&job_state=PROCESSING")
            lease_lost = lease_lost or not alive or bool(alive["late"])
        else:
            lease_lost = True
    ms = {route: [x * 1000 for x in lat] for route, lat in engine.latency.items() if lat}
    return {
        "server": kind, "idle": idle, "trickle": trickle, "seconds": seconds,
        "open_attack_connections": [open_at_start, open_at_end],
        "closed_by_server": attackers.closed_by_server,
        "connect_failures": attackers.connect_failures,
        "requests": sum(len(v) for v in ms.values()), "no_answer_in_5s": engine.no_answer,
        "lease_lost": lease_lost, "server_exit_code": exit_code,
        **{f"{route}_p50_ms": statistics.median(v) for route, v in ms.items()},
        **{f"{route}_p99_ms": percentile(v, 99) for route, v in ms.items()},
        **{f"{route}_max_ms": max(v) for route, v in ms.items()},
    }


def serve_other(kind: str, argv: list[str]) -> int:
    """Serve the manager's app with cheroot or waitress (the comparison's other servers)."""
    import logging

    from bcorch import config as config_mod
    from bcorch.manager.app import MAX_BODY
    from bcorch.manager.metrics import MetricsMiddleware
    from bcorch.manager.server import Service

    p = BenchParser()
    for flag in ("--config", "--input-dir", "--output-dir", "--db", "--port", "--log-level"):
        p.add_argument(flag)
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level or "WARNING")
    cfg = config_mod.load(args.config)
    cfg.override("manager", input_dir=args.input_dir, output_dir=args.output_dir, db=args.db,
                 port=0)  # the service's own (uvicorn) socket is bound, never served
    service = Service(cfg.manager, cfg.token)
    threading.Thread(target=service._every, daemon=True, name="reaper",
                     args=(service.reap_tick_s(), "lease reaper", service.manager.reap)).start()
    wsgi = MetricsMiddleware(service.app, service.app.metrics, service.app.routes)
    port, threads = int(args.port), cfg.manager.threads
    if kind == "cheroot":
        from cheroot.wsgi import Server as CherootServer
        server = CherootServer(("127.0.0.1", port), wsgi, numthreads=threads,
                               request_queue_size=256, timeout=120, shutdown_timeout=10)
        server.max_request_body_size = MAX_BODY
        server.max_request_header_size = 64 * 1024
        server.safe_start()
    elif kind == "waitress":
        import waitress
        waitress.serve(wsgi, host="127.0.0.1", port=port, threads=threads, channel_timeout=120,
                       connection_limit=5000, max_request_body_size=MAX_BODY, _quiet=True)
    else:
        raise SystemExit(f"--serve: unknown server {kind!r}")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--serve"]:
        return serve_other(argv[1], argv[2:])
    from bench_cluster import write_json

    from bcorch.manager.http_server import raise_open_files_limit

    p = BenchParser(prog="bench.py connections", description=__doc__.splitlines()[0])
    p.add_argument("--servers", default="uvicorn,cheroot,waitress")
    p.add_argument("--idle", type=non_negative_int, default=1000)
    p.add_argument("--trickle", type=non_negative_int, default=100)
    p.add_argument("--attack-seconds", type=float, default=30.0)
    p.add_argument("--clients", type=positive_int, default=64)
    p.add_argument("--mixed-seconds", type=float, default=10.0)
    p.add_argument("--threads", type=positive_int, default=16)
    p.add_argument("--skip-mixed", action="store_true")
    p.add_argument("--json", default="bench_connections.json")
    args = p.parse_args(argv)
    raise_open_files_limit()  # this process holds --idle + --trickle sockets
    results: dict = {"machine": f"{os.cpu_count()} cores", "python": sys.version.split()[0],
                     "mixed": [], "attack": []}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for kind in args.servers.split(","):
            if not args.skip_mixed:
                results["mixed"].append(bench_mixed(args.clients, args.mixed_seconds, tmp,
                                                    args.threads, kind))
            if args.attack_seconds > 0:
                results["attack"].append(bench_attack(kind, tmp, args.idle, args.trickle,
                                                      args.attack_seconds))
    out = write_json(args.json, results)
    print(f"{'server':9} {'mixed req/s':>11} {'CPU ms/req':>10} | attack: {'keepalive p99':>13} "
          f"{'assign p99':>10} {'no answer':>9} {'lease':>5}")
    attacks = {a["server"]: a for a in results["attack"]}
    for kind in args.servers.split(","):
        m = next((m for m in results["mixed"] if m["server"] == kind), {})
        a = attacks.get(kind, {"no_answer_in_5s": -1, "lease_lost": None})
        print(f"{kind:9} {m.get('requests_per_s', float('nan')):11.0f} "
              f"{m.get('server_cpu_ms_per_request', float('nan')):10.2f} | "
              f"{a.get('keepalive_p99_ms', float('nan')):11.0f}ms "
              f"{a.get('assignwork_p99_ms', float('nan')):8.0f}ms {a['no_answer_in_5s']:9d} "
              f"{'-' if a['lease_lost'] is None else 'LOST' if a['lease_lost'] else 'kept':>5}")
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
