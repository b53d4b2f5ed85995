"""The live page in a real browser: headless Debian Chromium, driven over the DevTools protocol.

Chromium speaks the protocol over a pipe (--remote-debugging-pipe: JSON messages ending in
NUL, read from its fd 3, written to its fd 4), so no debugging port is opened and no
driver or websocket package is needed. During a demo-sized run (real POD5 files, a real
manager with a token, bcorch with virtual GPUs and the simulate runner) the test logs in
with `/?token=` once, then checks that the page's numbers change and agree with /status,
that the cookie is HttpOnly (document.cookie cannot read it) and that the token is nowhere
in the page, and saves a screenshot (docs/img/live-page.png with BCORCH_UPDATE_SCREENSHOT=1).
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from manager_helpers import assign, complete, start_manager, wait_counts, write_files
from support import REPO, ManagedProcess, free_port, http_json, kill_tree, wait_until
from bcorch.config_writer import write_config
from bcorch.logs import WHOLE_JOB_ID
from bcorch.orchestrator.local_cluster import LocalCluster, bcorch_argv, manager_argv
from bcorch.orchestrator.pod5_dataset import write_dataset

TOKEN = "page-test-token-7Kq2"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = REPO / "docs" / "img" / "live-page.png"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1280,1000",
         "--remote-debugging-pipe")


class Browser:
    """Headless Chromium in its own session with a fresh profile; DevTools over a pipe."""

    def __init__(self, profile: Path, log_path: Path):
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # The browser reads commands from its fd 3 and writes answers to its fd 4.
        r, w = to_child_r, from_child_w
        shell = f'exec "$0" "$@" 3<&{r} 4>&{w} {r}<&- {w}>&-'
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            ["bash", "-c", shell, CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True)
        os.close(to_child_r)
        os.close(from_child_w)
        self._next_id = 0
        self._answers: dict[int, dict] = {}
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.session = ""

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._from_child, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._answers[-1] = {"error": {"message": "the browser closed its pipe"}}
                    self._cond.notify_all()
                return
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:
                    with self._cond:
                        self._answers[message["id"]] = message
                        self._cond.notify_all()

    def call(self, method: str, timeout: float = 60.0, **params: Any) -> dict:
        self._next_id += 1
        ident = self._next_id
        message = {"id": ident, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while ident not in self._answers and -1 not in self._answers:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"DevTools {method}: no answer in {timeout} s")
                self._cond.wait(left)
            answer = self._answers.pop(ident, None) or self._answers[-1]
        if "error" in answer:
            raise AssertionError(f"DevTools {method}: {answer['error']}")
        return answer["result"]

    def open_page(self) -> None:
        """Attach to the browser's own tab (a tab of our making could count as a background
        one, whose timers Chromium throttles), in front and focused."""
        pages = [t["targetId"] for t in self.call("Target.getTargets")["targetInfos"]
                 if t["type"] == "page"]
        target = pages[0] if pages else self.call("Target.createTarget",
                                                  url="about:blank")["targetId"]
        attached = self.call("Target.attachToTarget", targetId=target, flatten=True)
        self.session = attached["sessionId"]
        self.call("Page.enable")
        self.call("Network.enable")
        self.call("Page.bringToFront")
        self.call("Emulation.setFocusEmulationEnabled", enabled=True)

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def settled_js(self, expression: str) -> Any:
        """js() for polling across a navigation: None while no page context answers."""
        try:
            return self.js(expression)
        except AssertionError:
            return None

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except AssertionError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        kill_tree(self.proc.pid)
        self.proc.wait(timeout=10)
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        self._log.close()


def _shown_reads(reads: dict) -> list[str]:
    """/status reads as the page's data attributes hold them ("" while unknown)."""
    return ["" if reads[k] is None else str(reads[k]) for k in ("pass", "fail", "total")]


def _page_numbers(browser: Browser) -> dict:
    return browser.js("""(() => {
        const run = document.querySelector('.run');
        return {polls: Number(document.body.dataset.polls || 0),
                problem: document.getElementById('problem').textContent,
                runs: [...document.querySelectorAll('.run')].map(r => ({
                    id: r.dataset.runId, done: Number(r.dataset.filesDone),
                    total: Number(r.dataset.filesTotal),
                    state: r.querySelector('.state').textContent,
                    reads: [r.dataset.readsPass, r.dataset.readsFail, r.dataset.readsTotal],
                    readsText: r.querySelector('.reads').textContent})),
                done: run && Number(run.dataset.filesDone),
                total: run && Number(run.dataset.filesTotal),
                eta: run && run.dataset.etaS,
                engines: [...document.querySelectorAll('#engines tr[data-engine]')].map(tr =>
                    [...tr.children].map(td => td.textContent)),
                quarantined: [...document.querySelectorAll('#quarantined tr')].map(tr =>
                    [...tr.children].map(td => td.textContent)),
                barPixels: (() => {   // pixels in the bars' colour (#2f6fdb) on the chart
                    const c = document.querySelector('.run canvas');
                    if (!c || !c.width) return 0;
                    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                    let n = 0;
                    for (let i = 0; i < d.length; i += 4)
                        if (d[i] === 47 && d[i + 1] === 111 && d[i + 2] === 219) n++;
                    return n; })(),
                readsPixels: (() => {   // pixels in the reads line's colour (#d9480f)
                    const c = document.querySelector('.run canvas');
                    if (!c || !c.width) return 0;
                    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                    let n = 0;
                    for (let i = 0; i < d.length; i += 4)
                        if (d[i] === 217 && d[i + 1] === 72 && d[i + 2] === 15) n++;
                    return n; })()};
    })()""")


@pytest.fixture
def cluster(tmp_path):
    """A demo-sized run with a token: 24 real POD5 files (and one unreadable), 3 virtual
    GPUs, about 20 s of simulated basecalling: the page (a poll every 3 s) shows it move."""
    c = LocalCluster(tmp_path / "run", gpus=3,
                     manager={"report_back_interval": 15.0, "batch_size": 2, "token": TOKEN,
                              "max_attempts": 1, "allow_simulated": True},
                     runner={"kind": "simulate", "samples_per_s": 30_000.0})
    write_dataset(c.input_dir, 24, reads_per_file=20, samples_per_read=(2000, 6000))
    (c.input_dir / "broken.pod5").write_bytes(b"not a POD5 file " * 64)
    try:
        yield c
    finally:
        c.close(now=True)
        for proc in (c.bcorch, c.manager):
            if proc is not None:
                proc.close()


@pytest.fixture
def browser(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no chromium at {CHROMIUM}: .ci/run installs it (apt-get install chromium)")
    b = Browser(tmp_path / "profile", tmp_path / "chromium.log")
    try:
        yield b
    finally:
        b.close()


@pytest.mark.slow
def test_the_live_page_follows_a_run_in_a_real_browser(cluster, browser, tmp_path):
    def status() -> dict:
        code, body = http_json(cluster.url + "/status", TOKEN)
        assert code == 200, body
        return body

    cluster.start_manager(input_closed=True)
    wait_until(lambda: sum(status()["files"].values()) == 25, 60,
               what="the manager to find 25 files")
    browser.open_page()
    browser.navigate(f"{cluster.url}/?token={TOKEN}")
    wait_until(lambda: browser.settled_js("location.href") == cluster.url + "/", 30,
               what="the redirect from /?token= to /")
    wait_until(lambda: browser.settled_js("Number(document.body.dataset.polls || 0)"), 30,
               what="the page's first poll")
    first = _page_numbers(browser)
    assert first["problem"] == "" and first["done"] == 0 and first["total"] == 25
    assert first["barPixels"] == 0, "no bar before anything is done"

    cluster.start_bcorch()
    seen_done = [first["done"]]     # each value the page showed, in order
    mid_run: dict = {}              # the page while engines work, /status then, a screenshot

    def follow() -> bool:
        """Watch the page until the run is over, keeping it as it was last seen with an
        engine at work (preferably with something done: the screenshot for the docs)."""
        page = _page_numbers(browser)
        if page["done"] != seen_done[-1]:
            seen_done.append(page["done"])
        working = any(e[3] == "BUSY" for e in page["engines"])
        if working and (not mid_run or page["done"]):
            shot = browser.call("Page.captureScreenshot", format="png")["data"]
            mid_run.update(page=page, status=status(), shot=base64.b64decode(shot))
        s = status()
        return s["files"]["PENDING"] == 0 and s["files"]["ASSIGNED"] == 0
    try:
        wait_until(follow, 180, interval=0.5, what="the run to finish")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: the page showed {seen_done}, now {_page_numbers(browser)}"
                             f"; /status {status()}; bcorch log:\n"
                             f"{cluster.bcorch.log()[-3000:]}") from None
    assert mid_run, f"the page never showed an engine at work (done: {seen_done})"
    assert seen_done == sorted(seen_done) and len(seen_done) >= 2, seen_done
    moving, then = mid_run["page"], mid_run["status"]
    assert moving["total"] == then["progress"]["files_total"]
    assert moving["done"] <= then["progress"]["files_done"]   # the page shows a poll ago
    assert int(moving["runs"][0]["reads"][2] or 0) <= then["reads"]["total"]
    engines = moving["engines"]
    assert sorted(e[2] for e in engines) == ["0", "1", "2"]          # GPU from the engine id
    assert all(e[1] == e[0].rsplit("-gpu", 1)[0] for e in engines)  # host from the engine id
    busy = [e for e in engines if e[3] == "BUSY"]
    short_id = re.compile(r"j\d{6}-[0-9a-f]{4}( \(\+\d+\))?")   # as /status shows job ids
    assert busy and all(short_id.fullmatch(e[4]) and e[5].endswith(" s") for e in busy), engines
    shot = mid_run["shot"]
    final = status()

    def page_agrees() -> bool:
        now = _page_numbers(browser)
        return (now["done"], now["total"]) == (final["progress"]["files_done"],
                                               final["progress"]["files_total"]) \
            and len(now["quarantined"]) == final["files"]["QUARANTINED"] == 1 \
            and now["runs"][0]["reads"] == _shown_reads(final["reads"])
    wait_until(page_agrees, 30, interval=0.5, what="the page to agree with /status")
    shown = _page_numbers(browser)
    assert shown["done"] == 24 and "broken.pod5" in shown["quarantined"][0][0]
    reason = shown["quarantined"][0][2]
    assert reason.strip(), "the reason of the quarantined file is shown"
    assert not WHOLE_JOB_ID.search(reason), "with the job id cut as /status shows it"
    assert shown["barPixels"] > 50, "the throughput chart shows this minute's files"
    reads = final["reads"]
    assert reads["total"] == 24 * 20 and reads["jobs_counted"] == reads["jobs_done"], reads
    assert shown["runs"][0]["readsText"] == \
        f"{reads['total']:,} ({reads['pass']:,} pass, {reads['fail']:,} fail)"
    assert shown["readsPixels"] > 10, "the chart has a reads line (a dot per minute)"

    assert browser.js("document.cookie") == ""                      # HttpOnly
    cookies = browser.call("Network.getCookies", urls=[cluster.url + "/"])["cookies"]
    assert [(c["httpOnly"], c["sameSite"]) for c in cookies] == [(True, "Strict")]
    assert TOKEN not in cookies[0]["value"]
    source = browser.js("document.documentElement.outerHTML")
    raw = browser.js("fetch('/').then(r => r.text())")
    assert TOKEN not in source and TOKEN not in raw and TOKEN not in browser.js("location.href")
    manager_log = (cluster.workdir / "manager.log").read_text()
    assert TOKEN not in manager_log

    assert shot.startswith(b"\x89PNG")
    (tmp_path / "live-page.png").write_bytes(shot)
    if os.environ.get("BCORCH_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCREENSHOT.write_bytes(shot)


def _facility_run(root: Path, sample: str, n: int, files: int) -> str:
    """A MinKNOW-style run directory with `files` real POD5 files under pod5/."""
    name = f"20261126_1{n:03d}_P2S-0{n}-A_FLOW{n:03d}_abcd{n:04d}"
    pod5_dir = root / "proto" / sample / name / "pod5"
    write_dataset(pod5_dir, files, reads_per_file=5, samples_per_read=(2000, 4000), seed=n)
    return name


@pytest.mark.slow
def test_the_live_page_shows_each_run_of_a_facility(procs, browser, tmp_path):
    root = tmp_path / "root"
    first, second = _facility_run(root, "plain", 1, 6), _facility_run(root, "other", 2, 4)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    socket_dir = Path(tempfile.mkdtemp(prefix="bcp-", dir="/tmp"))
    try:
        cfg = write_config(
            tmp_path / "bcorch.toml",
            manager={"url": url, "port": port, "settle_s": 0.0, "scan_interval_s": 0.2,
                     "batch_size": 2, "token": TOKEN},
            engine={"polling_interval": 0.05, "work_until_none_left": True},
            runner={"stop_grace_s": 2.0, "samples_per_s": 100_000.0},
            orchestrator={"hang_timeout_s": 30.0, "drain_timeout_s": 30.0,
                          "control_socket": str(socket_dir / "c.sock")})
        manager = ManagedProcess(manager_argv(cfg, "--watch-root", str(root)),
                                 tmp_path / "manager.log")
        procs.append(manager)
        manager.start()

        def status() -> dict:
            try:
                code, body = http_json(url + "/status", TOKEN, timeout=5)
            except OSError:
                return {}
            return body if code == 200 else {}
        wait_until(lambda: len(status().get("runs", [])) == 2, 60, what="two runs found")
        browser.open_page()
        browser.navigate(f"{url}/?token={TOKEN}")
        wait_until(lambda: browser.settled_js("document.querySelectorAll('.run').length") == 2,
                   30, what="two runs shown")
        bcorch = ManagedProcess(bcorch_argv(cfg, 2), tmp_path / "bcorch.log")
        procs.append(bcorch)
        bcorch.start()

        def finished() -> bool:
            return all(r["progress"]["files_done"] == r["progress"]["files_total"] > 0
                       for r in status().get("runs", [{"progress": {"files_done": 0,
                                                                     "files_total": 0}}]))
        wait_until(finished, 180, interval=0.5, what="both runs basecalled")
        runs = {r["run_id"]: r for r in status()["runs"]}
        assert set(runs) == {first, second}
        assert (runs[first]["reads"]["total"], runs[second]["reads"]["total"]) == (30, 20)

        def page_agrees() -> bool:
            shown = {r["id"]: (r["done"], r["total"], r["state"], r["reads"])
                     for r in _page_numbers(browser)["runs"]}
            return shown == {i: (r["progress"]["files_done"], r["progress"]["files_total"],
                                 r["state"], _shown_reads(r["reads"])) for i, r in runs.items()}
        wait_until(page_agrees, 30, interval=0.5, what="the page to agree with /status runs")
        shown = _page_numbers(browser)
        assert shown["problem"] == ""
        shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
        (tmp_path / "live-page-facility.png").write_bytes(shot)
        code, live = http_json(url + "/live", TOKEN)
        assert code == 200 and set(live["history"]) == {first, second}
        assert {e["gpu"] for e in live["engines"]} == {"0", "1"}
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)


@pytest.mark.slow
def test_the_page_tells_reads_not_reported_from_zero_and_a_lower_bound(procs, browser,
                                                                      tmp_path):
    """The test plays the engines: nothing done is 0 reads; an original engine's batch (no
    counts) is "not reported", never 0; with one batch counted of two, "at least". Each
    time the page's numbers are /status's."""
    m = start_manager(procs, tmp_path, token=TOKEN, batch_size=1)
    write_files(tmp_path / "in", ["a.pod5", "b.pod5", "c.pod5"])
    wait_counts(m, PENDING=3)
    browser.open_page()
    browser.navigate(f"{m.url}/?token={TOKEN}")

    def shown_after_a_poll() -> dict:
        """The run as the page shows it after a poll that began after this call."""
        polls = browser.settled_js("Number(document.body.dataset.polls || 0)") or 0
        wait_until(lambda: (browser.settled_js("Number(document.body.dataset.polls || 0)")
                            or 0) >= polls + 2, 30, what="two more polls of the page")
        page = _page_numbers(browser)
        assert page["problem"] == "", page["problem"]
        (run,) = page["runs"]
        return run

    def status_reads() -> dict:
        code, body = http_json(m.url + "/status", TOKEN)
        assert code == 200, body
        return body["reads"]

    run = shown_after_a_poll()
    assert run["reads"] == _shown_reads(status_reads()) == ["0", "0", "0"]
    assert run["readsText"] == "0 (0 pass, 0 fail)"

    original = assign(m, "h-gpu0", 1)
    assert complete(m, original["jobid"], "DONE")[0] == 200     # no counts: unknown
    run = shown_after_a_poll()
    assert run["reads"] == _shown_reads(status_reads()) == ["", "", ""]
    assert run["readsText"] == "not reported (none of 1 done batches reported its reads)"

    counted = assign(m, "h-gpu1", 1)
    assert complete(m, counted["jobid"], "DONE", reads_pass=1234, reads_fail=5)[0] == 200
    run = shown_after_a_poll()
    assert run["reads"] == _shown_reads(status_reads()) == ["1234", "5", "1239"]
    assert run["readsText"] == "at least 1,239 (1,234 pass, 5 fail): counted for 1 of 2 " \
                              "done batches"
