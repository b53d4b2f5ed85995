"""scripts/grafana/bcorch.json queries only metrics that a live manager and a live bcorch serve.

Every PromQL expression of the dashboard (panel targets and template variables) is read by a
small PromQL lexer, which also checks brackets, label matchers and function names; the metric
names it finds must each be in a real scrape of the manager's /metrics (behind the token) or
of bcorch's metrics port, taken during a run of the simulate runner over virtual GPUs.
Label sets are not compared: a dashboard that aggregates with `sum by (...)` keeps working
when a label is added.
"""
from __future__ import annotations

import json
import re
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bcorch.orchestrator.local_cluster import LocalCluster
from bcorch.orchestrator.pod5_dataset import write_dataset
from support import REPO, free_port, wait_until

DASHBOARD = REPO / "scripts" / "grafana" / "bcorch.json"
TOKEN = "grafana-test-token"

FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg_over_time", "ceil", "changes", "clamp",
    "clamp_max", "clamp_min", "count_over_time", "day_of_month", "day_of_week", "days_in_month",
    "delta", "deriv", "exp", "floor", "histogram_quantile", "holt_winters", "hour", "idelta",
    "increase", "irate", "label_join", "label_replace", "last_over_time", "ln", "log2", "log10",
    "max_over_time", "min_over_time", "minute", "month", "predict_linear", "quantile_over_time",
    "rate", "resets", "round", "scalar", "sgn", "sort", "sort_desc", "sqrt", "stddev_over_time",
    "stdvar_over_time", "sum_over_time", "time", "timestamp", "vector", "year",
}
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
                "count_values", "bottomk", "topk", "quantile"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = AGGREGATIONS | GROUPING | {"bool", "and", "or", "unless", "offset", "atan2"}
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h",
                     "$host": ".*"}

TOKEN_RE = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<duration>(?:\d+(?:ms|[smhdwy]))+)
  | (?P<number>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<matcher>=~|!~|!=|==|>=|<=)
  | (?P<op>[-+*/%^=<>,])
  | (?P<open>[({\[])
  | (?P<close>[)}\]])
""", re.X)


def lex(expr: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(expr):
        m = TOKEN_RE.match(expr, pos)
        if not m:
            raise ValueError(f"cannot read {expr[pos:pos + 20]!r} at {pos} in {expr!r}")
        if m.lastgroup != "space":
            tokens.append((m.lastgroup, m.group()))
        pos = m.end()
    return tokens


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects; ValueError when it is not PromQL."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    if "$" in expr:
        raise ValueError(f"unknown Grafana variable in {expr!r}")
    tokens = lex(expr)
    names: set[str] = set()
    stack: list[str] = []
    grouping_list = False  # inside the (label, ...) list after by/without/on/...
    for i, (kind, text) in enumerate(tokens):
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        previous = tokens[i - 1][1] if i else ""
        if kind == "open":
            if text == "(" and previous in GROUPING:
                grouping_list = True
            stack.append(text)
        elif kind == "close":
            if not stack or {"(": ")", "{": "}", "[": "]"}[stack.pop()] != text:
                raise ValueError(f"unbalanced {text!r} in {expr!r}")
            grouping_list = False
        elif kind == "ident":
            if stack and stack[-1] == "{":
                if following not in ("=", "!=", "=~", "!~"):
                    raise ValueError(f"label {text!r} without a matcher in {expr!r}")
            elif grouping_list or text in KEYWORDS:
                continue
            elif following == "(":
                if text not in FUNCTIONS:
                    raise ValueError(f"unknown function {text!r} in {expr!r}")
            elif stack and stack[-1] == "[":
                raise ValueError(f"{text!r} is not a duration in {expr!r}")
            else:
                names.add(text)
        elif kind == "duration" and not (stack and stack[-1] == "[") and previous != "offset":
            raise ValueError(f"duration {text!r} outside a range in {expr!r}")
    if stack:
        raise ValueError(f"unclosed {stack[-1]!r} in {expr!r}")
    return names


def label_values_metric(query: str) -> set[str]:
    """Grafana's label_values(metric, label) variable query: the metric's names."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*", query)
    if not m:
        raise ValueError(f"not a label_values(metric, label) query: {query!r}")
    return metric_names(m.group(1))


def panels_of(items: list[dict]):
    for p in items:
        yield p
        yield from panels_of(p.get("panels", []))


def dashboard_queries(dashboard: dict) -> dict[str, set[str]]:
    """{where: metric names} of every query in the dashboard."""
    found = {}
    for p in panels_of(dashboard["panels"]):
        for t in p.get("targets", []):
            found[f"panel {p['title']!r} {t['refId']}"] = metric_names(t["expr"])
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            found[f"variable ${v['name']}"] = label_values_metric(query)
    return found


def exposed_names(text: str) -> set[str]:
    """Every series name a scrape declares: family names with their type's suffixes (a
    family without samples counts: virtual GPUs have no NVML gauges) and sample names."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                "summary": ("_count", "_sum")}
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + s for s in suffixes.get(family.type, ()))
        names.update(s.name for s in family.samples)
    return names


def scrape(url: str, token: str = "") -> str:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_imports_with_a_prometheus_input():
    """The shape Grafana 10/11 imports from a file: a ${DS_PROMETHEUS} input that every
    panel and query uses, unique panel ids, a place on the grid for each."""
    d = load_dashboard()
    assert [i["name"] for i in d["__inputs"]] == ["DS_PROMETHEUS"]
    assert d["__inputs"][0]["pluginId"] == "prometheus"
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert d["uid"] and d["title"] and d.get("id") is None
    panels = list(panels_of(d["panels"]))
    assert len({p["id"] for p in panels}) == len(panels)
    for p in panels:
        assert set(p["gridPos"]) == {"h", "w", "x", "y"}, p["title"]
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
            assert p["targets"], p["title"]
            for t in p["targets"]:
                assert t["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
    for v in d["templating"]["list"]:
        assert v["datasource"]["uid"] == "${DS_PROMETHEUS}"
    required = {r["id"] for r in d["__requires"] if r["type"] == "panel"}
    assert {p["type"] for p in panels} - {"row"} <= required
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_dashboard_covers_what_operators_watch():
    """Throughput, the queue by state, lease expiries, restarts, GPU temperature and memory,
    quarantined files, reads (and whether they were reported), the model on each GPU: each
    has a query."""
    queried = set().union(*dashboard_queries(load_dashboard()).values())
    for metric in ("bcmanager_files_done_total", "bcmanager_bytes_done_total", "bcmanager_files",
                   "bcmanager_lease_expiries_total", "bcorch_slot_restarts_total",
                   "bcorch_gpu_temperature_celsius", "bcorch_gpu_memory_used_bytes",
                   "bcmanager_files_quarantined", "bcmanager_reads_total",
                   "bcmanager_read_jobs_total", "bcorch_slot_model"):
        assert metric in queried, metric


@pytest.mark.parametrize("expr, names", [
    ('sum by (state) (bcmanager_files{state=~"DONE|QUARANTINED"})', {"bcmanager_files"}),
    ("histogram_quantile(0.99, sum by (le) (rate(x_bucket[$__rate_interval])))", {"x_bucket"}),
    ("a / on (host, gpu) group_left b offset 5m", {"a", "b"}),
    ('max(up{job="x"}) or vector(0)', {"up"}),
])
def test_metric_names_are_read_from_promql(expr, names):
    assert metric_names(expr) == names


@pytest.mark.parametrize("expr", [
    "sum(rate(x[5m])", "rat(x[5m])", "x{state}", "x[5q]", "sum by (a) (x} ", "x + $unknown",
])
def test_broken_promql_is_refused(expr):
    with pytest.raises(ValueError):
        metric_names(expr)


def test_every_dashboard_metric_is_served_by_a_live_manager_and_bcorch(tmp_path):
    metrics_port = free_port()
    cluster = LocalCluster(tmp_path, gpus=2, manager={"token": TOKEN, "batch_size": 2},
                           engine={"work_until_none_left": False},  # serve until stopped
                           orchestrator={"metrics_port": metrics_port, "exit_when_done": False})
    n_files = 8
    write_dataset(cluster.input_dir, n_files, reads_per_file=5, samples_per_read=4000)
    try:
        cluster.start_manager(wait_files=None)
        cluster.start_bcorch()
        manager_url = cluster.url + "/metrics"

        def finished() -> str | None:
            assert cluster.bcorch.running(), cluster.bcorch.log()[-3000:]
            text = scrape(manager_url, TOKEN)
            return text if sample(text, "bcmanager_files_done_total") == n_files else None
        manager_text = wait_until(finished, 90, interval=0.2, what="every file DONE in /metrics")

        def slots_published() -> str | None:
            try:
                text = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
            except OSError:  # not listening yet
                return None
            # the engines' counts arrive with their next heartbeat
            return text if sample(text, "bcorch_slot_files_total") == n_files else None
        bcorch_text = wait_until(slots_published, 30, what="every file in bcorch's metrics")
    finally:
        cluster.close(now=True)

    served = exposed_names(manager_text) | exposed_names(bcorch_text)
    missing = {where: sorted(names - served)
               for where, names in dashboard_queries(load_dashboard()).items() if names - served}
    assert not missing, f"the dashboard queries metrics no process serves: {missing}"

    assert sample(manager_text, "bcmanager_files", state="DONE") == n_files
    done_bytes = sum(p.stat().st_size for p in cluster.input_dir.rglob("*.pod5"))
    assert sample(manager_text, "bcmanager_bytes_done_total") == done_bytes
    assert sample(manager_text, "bcmanager_reads_total") == n_files * 5   # the engines count
    assert sample(manager_text, "bcmanager_read_jobs_total", reads="unknown") == 0
    assert sample(manager_text, "bcmanager_read_jobs_total", reads="known") >= n_files / 2
