#!/usr/bin/env python3
"""A careless user at every command line: bcorch, bcorch engine, bcmanager (serve and client
commands), the simulated basecaller and the benchmark entry point, with bad flags, bad config
files, bad environment variables, and peers that are not what they should be (a socket that is
a regular file, an HTTP server that is not a bcmanager). Each case is a real process with a
timeout, killed with its whole tree afterwards.

    python scripts/cli_sweep.py [--jobs 3] [--timeout 12] [--only TEXT] [--json OUT]

Flagged: a traceback, more than one stderr line (log lines excepted) on a failure, nothing on
stderr on a failure, exit 0 on bad input, argparse's usage block (bad input is one line naming
the flag, exit 78, the benchmarks included: scripts/bench_args.py), and a file that must be
left alone changed. A case
still running at its timeout accepted its input (a valid config serves); those are listed apart
to be read. The regression tests of what this found are tests/test_cli_bad_input.py.
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, socket, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bcorch.orchestrator.local_cluster import kill_tree

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
W = Path(tempfile.mkdtemp(prefix="bcorch-cli-sweep-"))
TIMEOUT = 12.0
(W / "xdg").mkdir(mode=0o700); (W / "in").mkdir(); (W / "out").mkdir(); (W / "root").mkdir()
(W / "afile").write_text("precious data\n")
(W / "dbfile").write_text("not a database, precious\n")
(W / "sockfile").write_text("a regular file, precious\n")
(W / "adir").mkdir()
long = W / ("x" * 120); long.mkdir()
def cfg(name, text, mode="w"):
    p = W / name
    if mode == "wb": p.write_bytes(text)
    else: p.write_text(text)
    return str(p)
C = {
 "empty": cfg("empty.toml", ""),
 "nonutf8": cfg("nonutf8.toml", b"[manager]\nhost = \"\xff\xfe\"\n", "wb"),
 "binary": cfg("binary.toml", b"\x00\x01\x02\xff" * 50, "wb"),
 "bom": cfg("bom.toml", b"\xef\xbb\xbf[manager]\nport = 1\n", "wb"),
 "nan": cfg("nan.toml", "[manager]\nreport_back_interval = nan\n"),
 "inf": cfg("inf.toml", "[manager]\nreport_back_interval = inf\n"),
 "ninf_settle": cfg("ninfsettle.toml", "[manager]\nsettle_s = -inf\n"),
 "nan_settle": cfg("nansettle.toml", "[manager]\nsettle_s = nan\n"),
 "inf_hang": cfg("infhang.toml", "[orchestrator]\nhang_timeout_s = inf\n"),
 "nan_hang": cfg("nanhang.toml", "[orchestrator]\nhang_timeout_s = nan\n"),
 "nan_poll": cfg("nanpoll.toml", "[engine]\npolling_interval = nan\n"),
 "nan_samples": cfg("nansamples.toml", "[runner]\nsamples_per_s = nan\n"),
 "nan_fail": cfg("nanfail.toml", "[runner]\nfail_fraction = nan\n"),
 "huge_int": cfg("hugeint.toml", "[manager]\nthreads = 9999999999999\n"),
 "huge_batch": cfg("hugebatch.toml", "[manager]\nbatch_size = 99999999999\n"),
 "huge_retries": cfg("hugeretries.toml", "[engine]\nrequest_retries = 999999999999999\n"),
 "huge_timeout": cfg("hugetimeout.toml", "[manager]\nrequest_timeout_s = 1e300\n"),
 "huge_lock": cfg("hugelock.toml", "[manager]\nlock_refresh_s = 1e300\n"),
 "zero_port": cfg("zeroport.toml", "[manager]\nport = 0\n"),
 "port70000": cfg("port70000.toml", "[manager]\nport = 70000\n"),
 "empty_url": cfg("emptyurl.toml", "[manager]\nurl = \"\"\n"),
 "url_http": cfg("urlhttp.toml", "[manager]\nurl = \"http://\"\n"),
 "empty_host": cfg("emptyhost.toml", "[manager]\nhost = \"\"\n"),
 "empty_model": cfg("emptymodel.toml", "[engine]\nmodel = \"\"\n"),
 "empty_gpus": cfg("emptygpus.toml", "[orchestrator]\ngpus = \"\"\n"),
 "bad_gpus": cfg("badgpus.toml", "[orchestrator]\ngpus = \"virtual:0\"\n"),
 "sock_in_file": cfg("sockinfile.toml", f"[orchestrator]\ncontrol_socket = \"{W}/afile/s.sock\"\n"),
 "input_file": cfg("inputfile.toml", f"[manager]\ninput_dir = \"{W}/afile\"\noutput_dir = \"{W}/out\"\n"),
 "output_file": cfg("outputfile.toml", f"[manager]\ninput_dir = \"{W}/in\"\noutput_dir = \"{W}/afile\"\n"),
 "db_dir": cfg("dbdir.toml", f"[manager]\ninput_dir = \"{W}/in\"\noutput_dir = \"{W}/out\"\ndb = \"{W}/adir\"\n"),
 "db_notsqlite": cfg("dbnotsqlite.toml", f"[manager]\ninput_dir = \"{W}/in\"\noutput_dir = \"{W}/out\"\ndb = \"{W}/dbfile\"\n"),
 "db_missingdir": cfg("dbmissing.toml", f"[manager]\ninput_dir = \"{W}/in\"\noutput_dir = \"{W}/out\"\ndb = \"{W}/nope/nope/x.sqlite\"\n"),
 "db_in_file": cfg("dbinfile.toml", f"[manager]\ninput_dir = \"{W}/in\"\noutput_dir = \"{W}/out\"\ndb = \"{W}/afile/x.sqlite\"\n"),
 "watch_file": cfg("watchfile.toml", f"[manager]\nwatch_root = \"{W}/afile\"\n"),
 "mirror_noroot": cfg("mirror.toml", f"[manager]\nwatch_root = \"{W}/root\"\n[facility]\noutput = \"mirror\"\n"),
 "mirror_fileroot": cfg("mirrorfile.toml", f"[manager]\nwatch_root = \"{W}/root\"\n[facility]\noutput = \"mirror\"\noutput_root = \"{W}/afile\"\n"),
 "rules_bad": cfg("rules.toml", "[[facility.rules]]\nsample = 1\nmodel = \"x\"\n"),
 "rules_table": cfg("rulestable.toml", "[facility.rules]\nsample = \"a\"\n"),
 "facility_prio_nan": cfg("prionan.toml", "[facility]\npriority = nan\n"),
 "slack_inf": cfg("slackinf.toml", "[facility]\nswitch_slack_s = inf\n"),
 "dupkey": cfg("dupkey.toml", "[manager]\nport = 1\nport = 2\n"),
 "extra_args_mixed": cfg("extraargs.toml", "[runner]\nextra_args = [\"a\", 1]\n"),
 "date": cfg("date.toml", "[manager]\nport = 1979-05-27\n"),
 "dotted": cfg("dotted.toml", "manager.port.x = 1\n"),
 "nested_table": cfg("nested.toml", "[manager.sub]\nx = 1\n"),
 "array_tables": cfg("arrtab.toml", "[[manager]]\nport = 1\n"),
 "engine_id_long": cfg("eid.toml", "[engine]\nengine_id = \"" + "a" * 65 + "\"\n"),
 "metrics_port_neg": cfg("mport.toml", "[orchestrator]\nmetrics_port = -5\n"),
 "metrics_host_bad": cfg("mhost.toml", "[orchestrator]\nmetrics_port = 1\nmetrics_host = \"999.999.1.1\"\n"),
 "dorado_missing": cfg("dorado.toml", "[runner]\nkind = \"dorado\"\ndorado_path = \"/nonexistent/dorado\"\n"),
 "script_missing": cfg("script.toml", "[runner]\nkind = \"script\"\nbc_script = \"/nonexistent/x.sh\"\n"),
 "script_empty": cfg("scriptempty.toml", "[runner]\nkind = \"script\"\n"),
 "models_dir_file": cfg("modelsfile.toml", f"[runner]\nkind = \"dorado\"\nmodels_directory = \"{W}/afile\"\n"),
 "tab_unicode_key": cfg("ukey.toml", "[manager]\n\"pörk\" = 1\n"),
}
unreadable = W / "unreadable.toml"; unreadable.write_text("[manager]\n"); unreadable.chmod(0)
C["unreadable"] = str(unreadable)
C["dir"] = str(W / "adir")
C["missing"] = str(W / "missing.toml")
C["fifo"] = str(W / "fifo.toml"); os.mkfifo(C["fifo"])

# A TCP server that answers garbage, and one that accepts and says nothing.
def tcp(handler):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(50)
    def loop():
        while True:
            c, _ = s.accept(); threading.Thread(target=handler, args=(c,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()
    return s.getsockname()[1]
def garbage(c):
    try: c.recv(1000); c.sendall(b"NOT HTTP AT ALL\r\n\r\n"); c.close()
    except OSError: pass
def silent(c):
    time.sleep(60)
def html(c):
    try: c.recv(4000); c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 5\r\n\r\n<html"); c.close()
    except OSError: pass
def json_wrong(c):
    try: c.recv(4000); b=b'{"hello": 1}'; c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(b) + b); c.close()
    except OSError: pass
def e500(c):
    try: c.recv(4000); b=b'boom\nline2'; c.sendall(b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n" % len(b) + b); c.close()
    except OSError: pass
GARB = tcp(garbage); SILENT = tcp(silent); HTML = tcp(html); JSONW = tcp(json_wrong); E500 = tcp(e500)
# unix socket that is silent / garbage
def unix(handler, name):
    p = str(W / name); s = socket.socket(socket.AF_UNIX); s.bind(p); s.listen(50)
    def loop():
        while True:
            c, _ = s.accept(); threading.Thread(target=handler, args=(c,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start(); return p
def ugarb(c):
    try: c.recv(1000); c.sendall(b"\xff\xfe garbage\n"); c.close()
    except OSError: pass
def ujson_wrong(c):
    try: c.recv(1000); c.sendall(b'{"ok": true}\n'); c.close()
    except OSError: pass
def ujson_list(c):
    try: c.recv(1000); c.sendall(b'[1,2]\n'); c.close()
    except OSError: pass
USOCK_G = unix(ugarb, "g.sock"); USOCK_S = unix(silent, "s.sock"); USOCK_J = unix(ujson_wrong, "j.sock"); USOCK_L = unix(ujson_list, "l.sock")

B = [PY, "-m", "bcorch.orchestrator"]
M = [PY, "-m", "bcorch.manager"]
E = [PY, "-m", "bcorch.workers.engine_cli"]
S = [PY, "-m", "bcorch.workers.runners.simulate_main"]
DEAD = "http://127.0.0.1:9"
SIM = cfg("sim.toml", "[runner]\nkind = \"simulate\"\n")
sock = lambda n: str(W / f"ctl{n}" / "s.sock")
CASES = []  # (name, argv, env)
def case(name, argv, env=None, ok_zero=False): CASES.append((name, argv, env or {}, ok_zero))

# ---- bcorch run
for spec in ["virtual:0", "virtual:-1", "0,0", "abc", "99", "", "virtual:", "virtual:abc", "0,,1",
             "GPU-nope", "virtual:1,0", ",", "-1", "virtual:99999999", "all,0", "virtual:1.5", " 0"]:
    case(f"bcorch --gpus {spec!r}", B + ["--config", SIM, "--gpus", spec, "--manager-url", DEAD, "--socket", sock(len(CASES))])
case("bcorch --gpus (no value)", B + ["--gpus"])
case("bcorch --config (no value)", B + ["--config"])
case("bcorch --socket (no value)", B + ["--gpus", "virtual:1", "--socket"])
for url in ["127.0.0.1:40765", "", "http://", "ftp://x", "http://127.0.0.1:70000", "http://[::1", "http:// spaces /",
            "HTTP://127.0.0.1:9"]:
    case(f"bcorch --manager-url {url!r}", B + ["--config", SIM, "--gpus", "virtual:1", "--manager-url", url, "--socket", sock(len(CASES))])
for s in [f"{W}/missing/deeper/s.sock", f"{W}/afile/s.sock", "/proc/nope/s.sock", str(W / "sockfile"),
          str(W / "adir"), "", str(long / "s.sock"), f"{W}/adir/"]:
    case(f"bcorch --socket {s[-30:]!r}", B + ["--config", SIM, "--gpus", "virtual:1", "--manager-url", DEAD, "--socket", s])
case("bcorch --log-level bogus", B + ["--log-level", "bogus"])
case("bcorch --bogus", B + ["--bogus"])
case("bcorch positional", B + ["frobnicate"])
case("bcorch --keep-serving=yes", B + ["--keep-serving=yes"])
for k, p in C.items():
    case(f"bcorch --config {k}", B + ["--config", p, "--gpus", "virtual:1", "--manager-url", DEAD, "--socket", sock(len(CASES))])
# ---- control commands
for cmd in ["status", "drain", "resume", "stop"]:
    case(f"bcorch {cmd} no bcorch", B + [cmd, "--socket", f"{W}/nothing/s.sock"])
    case(f"bcorch {cmd} socket=regular file", B + [cmd, "--socket", str(W / "sockfile")])
    case(f"bcorch {cmd} socket=dir", B + [cmd, "--socket", str(W / "adir")])
    case(f"bcorch {cmd} socket garbage", B + [cmd, "--socket", USOCK_G])
    case(f"bcorch {cmd} socket silent", B + [cmd, "--socket", USOCK_S, "--timeout", "1"])
    case(f"bcorch {cmd} socket json-wrong", B + [cmd, "--socket", USOCK_J])
    case(f"bcorch {cmd} socket json-list", B + [cmd, "--socket", USOCK_L])
case("bcorch restart no --gpu", B + ["restart", "--socket", USOCK_S])
for g in ["-1", "abc", "99999999999999999999999", "1.5", ""]:
    case(f"bcorch drain --gpu {g!r}", B + ["drain", "--gpu", g, "--socket", f"{W}/nothing/s.sock"])
for t in ["-1", "0", "nan", "inf", "abc", "1e308", "-inf"]:
    case(f"bcorch status --timeout {t}", B + ["status", "--timeout", t, "--socket", USOCK_S])
for t in ["0", "nan", "inf", "-1", "abc", "1e-9"]:
    case(f"bcorch status --watch {t}", B + ["status", "--watch", t, "--socket", f"{W}/nothing/s.sock"])
case("bcorch status long socket", B + ["status", "--socket", str(long / ("y" * 50) / "s.sock")])
case("bcorch status --socket ''", B + ["status", "--socket", ""])
case("bcorch status --config missing", B + ["status", "--config", C["missing"]])
case("bcorch status --config dir", B + ["status", "--config", C["dir"]])
case("bcorch status --config nonutf8", B + ["status", "--config", C["nonutf8"]])
case("bcorch status --config binary", B + ["status", "--config", C["binary"]])
case("bcorch status --config sock_in_file", B + ["status", "--config", C["sock_in_file"]])
case("bcorch status extra positional", B + ["status", "x"])
case("bcorch socket --config dir", B + ["socket", "--config", C["dir"]])
case("bcorch socket bogus", B + ["socket", "--bogus"])
# ---- gpus
for g in ["abc", "virtual:0", "99", "0,0", ""]:
    case(f"bcorch gpus --gpus {g!r}", B + ["gpus", "--gpus", g])
case("bcorch gpus (no NVML?)", B + ["gpus"], ok_zero=True)
# ---- demo
for a in [["--files", "0"], ["--files", "-1"], ["--files", "abc"], ["--gpus", "0"], ["--gpus", "-2"],
          ["--runs", "0"], ["--runs", "-1"], ["--workdir", str(W / "afile")], ["--workdir", "/proc/x/y"],
          ["--files", "1", "--runs", "5"], ["--seed", "x"], ["--gpus", "100000"], ["--files", "999999999"]]:
    case(f"bcorch demo {' '.join(a)}", B + ["demo"] + a)
# ---- engine
case("engine no --gpu", E)
for g in ["-1", "abc", "", "99999999999999999999"]:
    case(f"engine --gpu {g!r}", E + ["--gpu", g, "--manager-url", DEAD])
for url in ["127.0.0.1:9", "", "ftp://x", "http://[::1"]:
    case(f"engine --manager-url {url!r}", E + ["--gpu", "0", "--manager-url", url])
for eid in ["../x", "", "a b", "x" * 65]:
    case(f"engine --engine-id {eid[:10]!r}", E + ["--gpu", "0", "--engine-id", eid, "--manager-url", DEAD])
case("engine --log-level bogus", E + ["--gpu", "0", "--log-level", "x"])
case("bcorch engine --bogus", B + ["engine", "--bogus"])
case("engine --config json bad", E + ["--gpu", "0", "--config", cfg("bad.json", "{not json")])
case("engine --config json list", E + ["--gpu", "0", "--config", cfg("list.json", "[1,2]")])
case("engine --config json unknown", E + ["--gpu", "0", "--config", cfg("unk.json", '{"zzz": 1}')])
case("engine --config json wrongtype", E + ["--gpu", "0", "--config", cfg("wt.json", '{"polling_interval": "x"}')])
for k, p in C.items():
    case(f"engine --config {k}", E + ["--gpu", "0", "--config", p, "--manager-url", DEAD])
# ---- bcmanager serve
import itertools
_n = itertools.count()
def base_():
    d = W / f"out{next(_n)}"; d.mkdir(); return ["--input-dir", str(W / "in"), "--output-dir", str(d)]

for port in ["70000", "-1", "abc", "", "1.5"]:
    case(f"bcmanager --port {port!r}", M + base_() + ["--port", port])
case("bcmanager --port (missing)", M + base_() + ["--port"])
for host in ["999.1.1.1", "nonexistent.invalid", "", "::zz"]:
    case(f"bcmanager --host {host!r}", M + base_() + ["--port", "0", "--host", host])
case("bcmanager no dirs", M)
for name in ("bcmanager.journal", ".bcmanager.lock"):   # a FIFO there must not block the start
    for special in ("fifo", "dir"):
        args = base_()
        target = Path(args[-1]) / name
        os.mkfifo(target) if special == "fifo" else target.mkdir()
        case(f"bcmanager {name} is a {special}", M + args + ["--port", "0", "--input-closed"])
case("bcmanager --input-dir missing", M + ["--input-dir", str(W / "nope"), "--output-dir", str(W / "out")])
case("bcmanager --input-dir file", M + ["--input-dir", str(W / "afile"), "--output-dir", str(W / "out")])
case("bcmanager --input-dir ''", M + ["--input-dir", "", "--output-dir", str(W / "out")])
case("bcmanager --output-dir file", M + ["--input-dir", str(W / "in"), "--output-dir", str(W / "afile"), "--port", "0"])
case("bcmanager --output-dir unwritable", M + ["--input-dir", str(W / "in"), "--output-dir", "/proc/nope", "--port", "0"])
case("bcmanager --output-dir ''", M + ["--input-dir", str(W / "in"), "--output-dir", "", "--port", "0"])
case("bcmanager --db dir", M + base_() + ["--db", str(W / "adir"), "--port", "0"])
case("bcmanager --db not sqlite", M + base_() + ["--db", str(W / "dbfile"), "--port", "0"])
case("bcmanager --db in file", M + base_() + ["--db", str(W / "afile" / "x.sqlite"), "--port", "0"])
case("bcmanager --db unwritable", M + base_() + ["--db", "/proc/nope/x.sqlite", "--port", "0"])
case("bcmanager --watch-root missing", M + ["--watch-root", str(W / "nope")])
case("bcmanager --watch-root file", M + ["--watch-root", str(W / "afile")])
case("bcmanager --watch-root + --input-dir", M + ["--watch-root", str(W / "root"), "--input-dir", str(W / "in")])
case("bcmanager --watch-root + --output-dir", M + ["--watch-root", str(W / "root"), "--output-dir", str(W / "out")])
case("bcmanager --watch-root ''", M + ["--watch-root", "", "--port", "0"])
case("bcmanager --log-level bogus", M + base_() + ["--log-level", "bogus"])
case("bcmanager --bogus", M + ["--bogus"])
case("bcmanager files (unknown cmd)", M + ["files"])
case("bcmanager positional", M + ["frobnicate"])
case("bcmanager --token '' env newline", M + base_() + ["--port", "0"], env={"BCORCH_TOKEN": "a\nb"})
case("bcmanager STATE_DIRECTORY=file", M + base_() + ["--port", "0"], env={"STATE_DIRECTORY": str(W / "afile")})
case("bcmanager STATE_DIRECTORY=/proc", M + base_() + ["--port", "0"], env={"STATE_DIRECTORY": "/proc/nope"})
case("bcmanager XDG_STATE_HOME relative HOME=/proc", M + base_() + ["--port", "0"], env={"XDG_STATE_HOME": "rel", "HOME": "/proc/nope"})
for k, p in C.items():
    case(f"bcmanager --config {k}", M + ["--config", p, "--port", "0"] + ([] if k in ("dir", "fifo", "unreadable", "missing") or "dir =" in open(p, errors="replace").read() or "root" in open(p, errors="replace").read() else base_()))
# ---- bcmanager clients
for cmd in [["status"], ["close-input"], ["runs"], ["run", "pause", "r1"], ["status", "--json"]]:
    n = " ".join(cmd)
    case(f"bcmanager {n} not running", M + cmd + ["--url", DEAD])
    case(f"bcmanager {n} no scheme", M + cmd + ["--url", "127.0.0.1:9"])
    case(f"bcmanager {n} garbage server", M + cmd + ["--url", f"http://127.0.0.1:{GARB}"])
    case(f"bcmanager {n} html server", M + cmd + ["--url", f"http://127.0.0.1:{HTML}"])
    case(f"bcmanager {n} json-wrong server", M + cmd + ["--url", f"http://127.0.0.1:{JSONW}"])
    case(f"bcmanager {n} 500 server", M + cmd + ["--url", f"http://127.0.0.1:{E500}"])
    case(f"bcmanager {n} bad ipv6", M + cmd + ["--url", "http://[::1"])
    case(f"bcmanager {n} token newline", M + cmd + ["--url", DEAD, "--token", "a\nb"])
    case(f"bcmanager {n} env token newline", M + cmd + ["--url", DEAD], env={"BCORCH_TOKEN": "a\r\nX: y"})
    case(f"bcmanager {n} config dir", M + cmd + ["--config", C["dir"]])
case("bcmanager status silent server", M + ["status", "--url", f"http://127.0.0.1:{SILENT}"])
case("bcmanager status url port 70000", M + ["status", "--url", "http://127.0.0.1:70000"])
case("bcmanager status url ''", M + ["status", "--url", ""])
case("bcmanager status url unicode host", M + ["status", "--url", "http://ünï.invalid:9"])
case("bcmanager status url with path", M + ["status", "--url", "http://127.0.0.1:9/x?y"])
for t in ["0", "nan", "inf", "-1", "abc"]:
    case(f"bcmanager status --watch {t}", M + ["status", "--watch", t, "--url", DEAD])
case("bcmanager run (no args)", M + ["run"])
case("bcmanager run bogus r", M + ["run", "bogus", "r"])
case("bcmanager run pause (no id)", M + ["run", "pause"])
case("bcmanager run pause '' ", M + ["run", "pause", "", "--url", DEAD])
case("bcmanager runs --bogus", M + ["runs", "--bogus"])
case("bcmanager close-input --json", M + ["close-input", "--json"])
# ---- simulate runner
for a in [[], ["--input-dir", str(W / "in")], ["--input-dir", str(W / "nope"), "--output-dir", str(W / "o1")],
          ["--input-dir", str(W / "afile"), "--output-dir", str(W / "o2")],
          ["--input-dir", str(W / "in"), "--output-dir", str(W / "afile")],
          ["--input-dir", str(W / "in"), "--output-dir", "/proc/nope"],
          ["--input-dir", str(W / "in"), "--output-dir", str(W / "o3"), "--samples-per-s", "0"],
          ["--input-dir", str(W / "in"), "--output-dir", str(W / "o3"), "--samples-per-s", "nan"],
          ["--input-dir", str(W / "in"), "--output-dir", str(W / "o3"), "--startup-s", "nan"],
          ["--input-dir", str(W / "in"), "--output-dir", str(W / "o3"), "--startup-s", "inf"],
          ["--input-dir", str(W / "in"), "--output-dir", str(W / "o3"), "--fail-fraction", "nan"],
          ["--input-dir", str(W / "in"), "--output-dir", str(W / "o3"), "--fail-fraction", "2"],
          ["--input-dir", str(W / "in"), "--output-dir", str(W / "o3"), "--emit", "sam"],
          ["--input-dir", str(W / "in"), "--output-dir", str(W / "o3"), "--started-at", "nan"],
          ["--input-dir", str(W / "in"), "--output-dir", str(W / "o3"), "--started-at", "-inf"]]:
    case(f"simulate {' '.join(x[-12:] for x in a)}", S + a)
# ---- scripts
case("bench.py nothing", [PY, str(REPO / "scripts" / "bench.py")])
case("bench.py bogus", [PY, str(REPO / "scripts" / "bench.py"), "bogus"])
for part in ["manager", "engine", "orchestrator", "fleet", "recovery", "overhead", "live", "connections", "facility", "output_check"]:
    case(f"bench.py {part} --bogus", [PY, str(REPO / "scripts" / "bench.py"), part, "--bogus"])
    case(f"bench.py {part} --files -1", [PY, str(REPO / "scripts" / "bench.py"), part, "--files", "-1"])
for script in sorted((REPO / "scripts").glob("bench_*.py")):  # run by hand, not through bench.py
    if "__main__" in script.read_text():
        case(f"{script.name} --bogus", [PY, str(script), "--bogus"])
case("bench.py output_check --repeat 0", [PY, str(REPO / "scripts" / "bench.py"), "output_check", "--repeat", "0"])
case("gpu_host_check --files abc", [PY, str(REPO / "scripts" / "gpu_host_check.py"), "--files", "abc"])

def run(c):
    name, argv, env, ok_zero = c
    e = {**os.environ, **env}
    if "BCORCH_TOKEN" not in env:
        e.pop("BCORCH_TOKEN", None)
    e["XDG_RUNTIME_DIR"] = str(W / "xdg")
    e.setdefault("STATE_DIRECTORY", str(W / "state"))
    t = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e,
                         cwd=str(W), stdin=subprocess.DEVNULL, errors="replace",
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=TIMEOUT)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        kill_tree(p.pid)
        out, err = p.communicate()
        rc = "RAN"
    probs = []
    failed = rc not in ("RAN", 0)
    if "Traceback" in err or "Traceback" in out:
        probs.append("TRACEBACK")
    if rc == 0 and not ok_zero:
        probs.append("EXIT0")
    if failed and len([l for l in err.strip().splitlines() if not l[:4].isdigit()]) > 1:
        probs.append("MULTILINE")
    if failed and not err.strip():
        probs.append("NOSTDERR")
    if failed and any(line.startswith("usage:") for line in err.splitlines()):
        probs.append("USAGE")   # argparse's usage block: bad input is one line naming the flag
    return dict(name=name, rc=rc, probs=probs, err=err.strip()[-1500:], out=out.strip()[-300:],
                s=round(time.monotonic() - t, 1))


def main() -> int:
    global TIMEOUT
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=3)
    p.add_argument("--timeout", type=float, default=12.0)
    p.add_argument("--only", default="", help="run the cases whose name contains this")
    p.add_argument("--json", help="write every case's result here")
    args = p.parse_args()
    TIMEOUT = args.timeout
    sel = [c for c in CASES if args.only in c[0]]
    with ThreadPoolExecutor(args.jobs) as ex:
        results = list(ex.map(run, sel))
    for f, text in (("afile", "precious data\n"), ("dbfile", "not a database, precious\n"),
                    ("sockfile", "a regular file, precious\n")):
        got = (W / f).read_text() if (W / f).is_file() else None
        if got != text:
            results.append(dict(name=f"DATA LOSS {f}", rc="-", probs=["DATALOSS"], err=repr(got),
                                out="", s=0))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    bad = [r for r in results if r["probs"]]
    ran = [r for r in results if r["rc"] == "RAN" and not r["probs"]]
    print(f"{len(results)} cases: {len(bad)} flagged, {len(ran)} accepted and still running "
          f"after {TIMEOUT:g} s, {len(results) - len(bad) - len(ran)} refused cleanly")
    for r in bad:
        print(f"--- FLAGGED {r['name']}: exit {r['rc']} {r['probs']}\n{r['err'][-700:]}")
    for r in ran:
        print(f"--- ACCEPTED {r['name']}")
    shutil.rmtree(W, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
