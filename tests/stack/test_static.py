"""What cannot run here (Docker, the Collector, Tempo, Grafana) checked against the code; what can
(promtool, amtool) run on the committed files.

* the alert and recording rules are generated from karn_otel/health.py and the metric registry,
  and the committed files are the generator's output; promtool checks them and runs their unit
  tests; the Ranks dashboard reads the recording rules, never every rank's raw series;
* every metric a rule, dashboard or data source names is one Karn exports (its Prometheus name);
* dashboards: variables, data source uids that are provisioned, thresholds that are the
  HealthMonitor's, Tempo queries that use the span and attribute names the OTel sink writes;
* docker-compose.yml: pinned images, loopback-only ports, mounts that exist, Grafana's admin
  password from the environment;
* the Collector: components that exist in the pinned version, pipelines that reference defined
  components, and metric names identical to the embedded endpoint's.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from karn_otel import metrics_registry as reg
from karn_otel import stack_rules
from karn_otel.contracts import SeedStage
from karn_otel.health import CHECKS, RETURN_CHECKS, entropy_floors
from karn_otel.health import DEFAULT_THRESHOLDS as T
from tests.stack.conftest import AMTOOL, PROMTOOL, REPO, STACK, require

pytestmark = pytest.mark.stack

RULES = STACK / "prometheus" / "rules" / "karn-alerts.yml"
RULE_TESTS = STACK / "prometheus" / "tests" / "karn-alerts.test.yml"
RECORDING = STACK / "prometheus" / "rules" / "karn-recording.yml"
RECORDING_TESTS = STACK / "prometheus" / "tests" / "karn-recording.test.yml"
PROMETHEUS_YML = STACK / "prometheus" / "prometheus.yml"
ALERTMANAGER_YML = STACK / "alertmanager" / "alertmanager.yml"
DATASOURCES = STACK / "grafana" / "provisioning" / "datasources" / "datasources.yaml"
DASHBOARD_PROVIDERS = STACK / "grafana" / "provisioning" / "dashboards" / "dashboards.yaml"
TEMPO = STACK / "tempo" / "tempo.yaml"
COLLECTOR = REPO / "collector-config" / "otel-collector.yaml"
COMPOSE = REPO / "docker-compose.yml"
DASHBOARDS = sorted((REPO / "dashboards").glob("*.json"))

PROM_NAMES = {p for m in reg.METRICS for p in m.prometheus_series}  # a histogram's _bucket, _sum, _count
# Series Prometheus makes itself; dashboards and rules may use them besides Karn's.
PROMETHEUS_BUILTINS = {"ALERTS", "ALERTS_FOR_STATE", "up"}
REQUIRED_ALERTS = {
    "KarnEntropyCollapse",
    "KarnValueCollapse",
    "KarnKLTooHigh",
    "KarnExplainedVarianceNegative",
    "KarnLossSpike",
    "KarnGradientExplosion",
    "KarnAccuracyDrop",
    "KarnNonFiniteReturn",
    "KarnReturnRegression",
    "KarnRankMissing",
    "KarnTelemetryDropping",
    "KarnWatchdog",
}
ALERTS_MD = REPO / "docs" / "alerts.md"
DASHBOARD_VARIABLES = {"run_id", "rank", "__rate_interval", "__interval", "__range"}
REQUIRED_DASHBOARDS = {"karn-training", "karn-policy", "karn-gradients", "karn-ranks"}
REQUIRED_SERVICES = {"otel-collector", "prometheus", "tempo", "grafana", "alertmanager"}

# PromQL words that look like metric names but are not.
_PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "abs",
    "rate",
    "increase",
    "irate",
    "delta",
    "idelta",
    "changes",
    "resets",
    "label_replace",
    "label_join",
    "present_over_time",
    "last_over_time",
    "max_over_time",
    "min_over_time",
    "avg_over_time",
    "count_over_time",
    "absent",
    "absent_over_time",
    "clamp_min",
    "clamp_max",
    "time",
    "timestamp",
    "vector",
    "scalar",
    "Inf",
    "NaN",
}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (identifiers outside strings, braces and brackets)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", "{}", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "[]", text)  # ranges
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    names = set(re.findall(r"(?<![\w.])([a-zA-Z_:][\w:]*)\b(?!\s*\()", text))
    return {n for n in names if n not in _PROMQL_WORDS and not re.fullmatch(r"\d.*|e\d+", n)}


def karn_metric_names(expr: str) -> set[str]:
    return metric_names(expr) - PROMETHEUS_BUILTINS


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def rules() -> list[dict]:
    return [r for g in load_yaml(RULES)["groups"] for r in g["rules"]]


def recordings() -> list[dict]:
    return [r for g in load_yaml(RECORDING)["groups"] for r in g["rules"]]


RECORDED = set(stack_rules.recorded_names())


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)


# --------------------------------------------------------------------------- alert rules


def test_rules_file_is_the_generators_output():
    assert RULES.read_text() == stack_rules.render(), "stale: run python -m karn_otel.stack_rules --write"
    assert RECORDING.read_text() == stack_rules.render_recording(), "stale: run python -m karn_otel.stack_rules --write"
    assert stack_rules.main(["--check"]) == 0


def test_rule_generator_imports_neither_torch_nor_opentelemetry():
    code = "import sys, karn_otel.stack_rules; print(sorted(m for m in ('torch', 'opentelemetry') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_one_alert_per_health_check_plus_karns_own():
    names = [r["alert"] for r in rules()]
    assert len(names) == len(set(names))
    assert REQUIRED_ALERTS <= set(names)
    by_alert = {r["alert"]: r for r in rules()}
    for spec in CHECKS + RETURN_CHECKS:
        r = by_alert[stack_rules.alert_name(spec.name)]
        assert r["labels"]["check"] == spec.name
        assert r["labels"]["severity"] == spec.severity.value
        assert f'karn_health_status{{check="{spec.name}"}} > 0' in r["expr"], "the HealthMonitor's held verdict"
        events = f'karn_health_alerts_total{{check="{spec.name}", severity!="ok"}}'
        assert f"increase({events}[{stack_rules.HOLD}]) > 0" in r["expr"], "the alert events, however short"
        assert f"{events} offset {stack_rules.HOLD}" in r["expr"], "a series first seen above 0 counts"
        assert r["for"] == "0s", "an event lasts one epoch: no for:"
    for r in rules():
        assert re.fullmatch(r"\d+[smh]", r["for"]), r["alert"]
        if r["alert"] == "KarnWatchdog":
            assert r["expr"] == "vector(1)" and r["labels"]["severity"] == "none"
            continue
        assert r["labels"]["severity"] in ("warning", "critical")
        explore = r["annotations"]["explore"]
        assert explore.startswith("http://127.0.0.1:3000/explore?") and "karn-tempo" in explore
        assert "{{ $labels.run_id | urlquery }}" in explore, "the run's traces"
        for key in ("summary", "description"):
            assert "$labels.run_id" in r["annotations"][key] and "$labels.rank" in r["annotations"][key], (
                r["alert"],
                key,
            )


def test_rule_thresholds_are_the_health_monitors():
    """The raw-metric fallbacks inline DEFAULT_THRESHOLDS, the annotations quote them."""
    by_alert = {r["alert"]: r for r in rules()}
    inlined = {
        "KarnEntropyCollapse": f"karn_ppo_entropy < {T.entropy_collapse_nats!r}",
        "KarnKLTooHigh": f"abs(karn_ppo_kl_divergence) > {T.kl_too_high!r}",
        "KarnKLTooLow": f"abs(karn_ppo_kl_divergence) < {T.kl_too_low!r}",
        "KarnLSTMSaturation": f"karn_ppo_lstm_saturation_fraction > {T.lstm_saturation_fraction!r}",
        "KarnIsolationLeakage": f"abs(karn_host_grad_isolation_leakage) > {T.isolation_leakage_epsilon!r}",
        "KarnValueCollapse": f"< {T.value_collapse_ratio!r} and karn_ppo_explained_variance < 1",
    }
    for alert, text in inlined.items():
        assert text in by_alert[alert]["expr"], (alert, text)
    assert "karn_ppo_explained_variance < 0" in by_alert["KarnExplainedVarianceNegative"]["expr"]
    assert f"> {T.loss_spike_ratio:g} ratio" in by_alert["KarnLossSpike"]["annotations"]["description"]
    assert f"> {T.gradient_explosion_ratio:g} ratio" in by_alert["KarnGradientExplosion"]["annotations"]["description"]
    # Per-head entropy floors, as KarnConfig.policy_head_sizes gives the monitor.
    sizes = {"op": 4, "slot": 3, "blend": 2}
    text = stack_rules.render(head_sizes=sizes)
    for head, floor in entropy_floors(sizes).items():
        assert f'karn_ppo_entropy{{head="{head}"}} < {floor!r}' in text
    assert f'karn_ppo_entropy{{head!~"blend|op|slot"}} < {T.entropy_collapse_nats!r}' in text


def test_every_metric_a_rule_names_is_exported_by_karn():
    for r in rules():
        names = karn_metric_names(r["expr"])
        assert names or r["alert"] == "KarnWatchdog", r["alert"]
        assert names <= PROM_NAMES, (r["alert"], names - PROM_NAMES)


def test_promtool_checks_the_rules():
    promtool = require(PROMTOOL, "promtool", "prometheus")
    result = run([promtool, "check", "rules", str(RULES), str(RECORDING)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(recordings())} rules found" in result.stdout, result.stdout


def test_promtool_rule_unit_tests_pass():
    promtool = require(PROMTOOL, "promtool", "prometheus")
    result = run([promtool, "test", "rules", str(RULE_TESTS), str(RECORDING_TESTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_return_checks_alerts_fire_and_stay_quiet_in_their_unit_tests():
    """Each ReturnMonitor check has its own alert, with a firing and a must-not-fire case."""
    doc = load_yaml(RULE_TESTS)
    [group] = [t for t in doc["tests"] if t["name"].startswith("return checks")]
    cases = group["alert_rule_test"]
    for spec in RETURN_CHECKS:
        name = stack_rules.alert_name(spec.name)
        fired = [c for c in cases if c["alertname"] == name and c["exp_alerts"]]
        assert fired and [c for c in cases if c["alertname"] == name and not c["exp_alerts"]], name
        assert all(a["exp_labels"]["check"] == spec.name for c in fired for a in c["exp_alerts"])


# --------------------------------------------------------------------------- recording rules


def test_recording_rules_follow_the_naming_convention_and_keep_labels_bounded():
    """level:metric:operations; level rank = labels (run_id, rank), level run = run_id; metric is Karn's."""
    names = [r["record"] for r in recordings()]
    assert len(names) == len(set(names)) and set(names) == RECORDED
    histograms = {m.prometheus_name for m in reg.METRICS if m.kind == "histogram"}
    prom = {m.prometheus_name for m in reg.METRICS}
    for r in recordings():
        level, metric, ops = r["record"].split(":")
        assert level in ("rank", "run") and ops, r["record"]
        assert metric in prom | histograms, r["record"]
        expr = " ".join(r["expr"].split())
        # the outermost aggregation (or the rules it combines) fixes the output labels
        if level == "rank":
            assert re.match(r"(sum|max) by \(run_id, rank\)", expr) or expr.startswith("rank:"), r["record"]
        elif metric == "karn_telemetry_events_accepted_total":
            assert expr.startswith("count by (run_id, world_size) ("), r["record"]
        else:
            assert re.match(r"(max|min|avg|sum|quantile) by \(run_id\) \(", expr) or re.fullmatch(
                r"run:\S+ - run:\S+", expr
            ), r["record"]
        assert "without" not in expr and "instance" not in expr, r["record"]


def test_recording_rules_read_karns_per_rank_series_or_rules_recorded_above_them():
    seen: set[str] = set()
    for r in recordings():
        names = karn_metric_names(r["expr"])
        assert names, r["record"]
        assert names <= PROM_NAMES | seen, (r["record"], names - PROM_NAMES - seen)
        for name in names - seen:  # a raw series: per-rank only, never the job-wide (scope="job") one
            for sel in re.findall(rf"(?<![\w:]){re.escape(name)}(?![\w:])(\{{[^}}]*\}})?", r["expr"]):
                assert sel == stack_rules.PER_RANK, (r["record"], name, sel)
        seen.add(r["record"])


def test_every_recording_rule_has_a_unit_test_case():
    doc = load_yaml(RECORDING_TESTS)
    assert doc["rule_files"] == ["../rules/karn-recording.yml"]
    tested = {case["expr"] for t in doc["tests"] for case in t.get("promql_expr_test", [])}
    assert RECORDED <= tested, RECORDED - tested
    # the Ranks dashboard's Worst ranks query, as the generator writes it, for run r4
    assert " ".join(stack_rules.worst_ranks_expr('{run_id="r4"}').split()) in {" ".join(e.split()) for e in tested}


def test_rule_unit_tests_have_a_firing_and_a_quiet_case_for_every_rule():
    doc = load_yaml(RULE_TESTS)
    assert doc["rule_files"] == ["../rules/karn-alerts.yml"]
    fires, quiet = set(), set()
    for test in doc["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {r["alert"] for r in rules()}
    assert names <= fires, f"no firing case for {names - fires}"
    always = {"KarnWatchdog"}  # fires by design
    assert names - always <= quiet, f"no must-not-fire case for {names - always - quiet}"


def test_every_alert_has_a_runbook_section():
    """runbook_url is a section of docs/alerts.md that says what it means, what to look at, what fixes it."""
    text = ALERTS_MD.read_text()
    sections = dict(re.findall(r"^## (Karn\w+)\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S))
    for r in rules():
        url = r["annotations"]["runbook_url"]
        assert url == f"docs/alerts.md#{r['alert'].lower()}", (r["alert"], url)
        body = sections.get(r["alert"])
        assert body, f"docs/alerts.md has no '## {r['alert']}' section"
        for part in ("**What it means.**", "**Look first.**", "**Usually fixes it.**"):
            assert part in body, (r["alert"], part)


def test_rank_missing_is_about_an_open_episode_only():
    [r] = [r for r in rules() if r["alert"] == "KarnRankMissing"]
    assert "karn_episode_complete" in r["expr"] and "== 0" in r["expr"]
    assert "karn_host_epoch" not in r["expr"], "a rank that finished before another is not missing"


# --------------------------------------------------------------------------- Prometheus, Alertmanager


def test_prometheus_config():
    cfg = load_yaml(PROMETHEUS_YML)
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    collector = jobs["otel-collector"]
    assert "honor_labels" not in collector, "the Collector's own metrics: this scrape's job/instance"
    assert collector["static_configs"][0]["targets"] == ["otel-collector:8888"]
    karn_targets = jobs["karn"]["static_configs"][0]["targets"]
    assert karn_targets[0] == "host.docker.internal:9464", "Karn's default base port, rank 0"
    assert karn_targets == [f"host.docker.internal:{9464 + k}" for k in range(len(karn_targets))], "one port per rank"
    assert cfg["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    assert cfg["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]


def test_promtool_checks_the_config_with_its_rules(tmp_path):
    """promtool check config, once as shipped and once with rule_files pointing at the repository."""
    promtool = require(PROMTOOL, "promtool", "prometheus")
    result = run([promtool, "check", "config", str(PROMETHEUS_YML)])
    assert result.returncode == 0, result.stdout + result.stderr
    cfg = load_yaml(PROMETHEUS_YML)
    assert cfg["rule_files"] == ["/etc/prometheus/rules/*.yml"], "both rule files are loaded"
    cfg["rule_files"] = [str(RULES.parent / "*.yml")]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(cfg))
    result = run([promtool, "check", "config", str(local)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules())} rules found" in result.stdout, result.stdout
    assert f"{len(recordings())} rules found" in result.stdout, result.stdout


def test_amtool_checks_the_alertmanager_config():
    amtool = require(AMTOOL, "amtool", "prometheus-alertmanager")
    result = run([amtool, "check-config", str(ALERTMANAGER_YML)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_groups_by_alert_and_run_and_posts_to_a_webhook():
    cfg = load_yaml(ALERTMANAGER_YML)
    assert {"alertname", "run_id"} <= set(cfg["route"]["group_by"])
    receivers = {r["name"]: r for r in cfg["receivers"]}
    hooks = receivers[cfg["route"]["receiver"]]["webhook_configs"]
    assert hooks and all(h["url"].startswith("http") and h["send_resolved"] for h in hooks)
    watchdog = [r for r in cfg["route"]["routes"] if r["matchers"] == ['alertname="KarnWatchdog"']]
    assert watchdog and watchdog[0]["repeat_interval"] == "5m", "the watchdog arrives often"


def test_inhibition_only_silences_related_alerts():
    """Every inhibit rule names its source and target alerts and keeps to one run and rank."""
    names = {r["alert"] for r in rules()}
    for rule in load_yaml(ALERTMANAGER_YML)["inhibit_rules"]:
        assert set(rule["equal"]) >= {"run_id", "rank"}, rule
        for side in ("source_matchers", "target_matchers"):
            [m] = rule[side]
            found = re.fullmatch(r'alertname=~?"([\w|]+)"', m)
            assert found, (side, m)
            assert set(found.group(1).split("|")) <= names - {"KarnWatchdog"}, m


# --------------------------------------------------------------------------- dashboards


def dashboards() -> dict[str, dict]:
    return {json.loads(p.read_text())["uid"]: json.loads(p.read_text()) for p in DASHBOARDS}


def walk(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def provisioned() -> dict[str, dict]:
    return {d["uid"]: d for d in load_yaml(DATASOURCES)["datasources"]}


def prom_exprs(board: dict) -> list[tuple[str, str]]:
    out = [(p.get("title", ""), t["expr"]) for p in board["panels"] for t in p.get("targets", []) if "expr" in t]
    out += [(a["name"], a["expr"]) for a in board["annotations"]["list"] if "expr" in a]
    for v in board["templating"]["list"]:
        if v["type"] == "query":  # label_values(<selector>, <label>): the selector is PromQL
            m = re.fullmatch(r"label_values\((.+), \w+\)", v["query"]["query"])
            out.append((v["name"], m.group(1)))
    return out


def test_dashboards_exist_and_are_well_formed():
    boards = dashboards()
    assert REQUIRED_DASHBOARDS <= set(boards)
    for uid, board in boards.items():
        assert board["title"] and board["tags"] == ["karn"]
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), uid
        for p in board["panels"]:
            g = p["gridPos"]
            assert g["x"] + g["w"] <= 24, (uid, p["title"])
            if p["type"] != "row":
                assert p["targets"], (uid, p["title"])
                assert {t["refId"] for t in p["targets"]} and len({t["refId"] for t in p["targets"]}) == len(
                    p["targets"]
                )


def test_every_dashboard_has_run_and_rank_variables():
    for uid, board in dashboards().items():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        for name in ("run_id", "rank"):
            v = variables[name]
            assert v["type"] == "query" and v["datasource"]["uid"] == "karn-prometheus", (uid, name)
            m = re.fullmatch(r"label_values\((\w+)(\{.*\})?, (\w+)\)", v["query"]["query"])
            assert m and m.group(3) == name and m.group(1) in PROM_NAMES, (uid, v["query"])
        assert variables["rank"]["includeAll"] and variables["rank"]["multi"]


def test_dashboards_use_only_provisioned_datasources():
    types = {uid: d["type"] for uid, d in provisioned().items()}
    for uid, board in dashboards().items():
        refs = [n["datasource"] for n in walk(board) if isinstance(n.get("datasource"), dict)]
        refs = [r for r in refs if r.get("type") != "grafana"]  # Grafana's built-in annotation source
        assert refs, uid
        for ref in refs:
            assert ref["uid"] in types, (uid, ref)
            assert types[ref["uid"]] == ref["type"], (uid, ref)


def test_every_metric_a_dashboard_names_is_exported_by_karn():
    """Karn's own series, or one of its recording rules (stack/prometheus/rules/karn-recording.yml)."""
    for uid, board in dashboards().items():
        for title, expr in prom_exprs(board):
            names = karn_metric_names(expr)
            assert names <= PROM_NAMES | RECORDED, (uid, title, names - PROM_NAMES - RECORDED)
            assert names or metric_names(expr) & PROMETHEUS_BUILTINS, (uid, title, expr)
            assert set(re.findall(r"\$\{?(\w+)", expr)) <= DASHBOARD_VARIABLES, (uid, title, expr)


def test_alerts_link_to_existing_dashboards():
    boards = dashboards()
    grafana_port = load_yaml(COMPOSE)["services"]["grafana"]["ports"][0].split(":")[1]
    for r in rules():
        m = re.fullmatch(
            r"http://127\.0\.0\.1:(\d+)/d/([\w-]+)(?:\?var-run_id=\{\{ \$labels\.run_id \}\}.*)?",
            r["annotations"]["dashboard"],
        )
        assert m and m.group(1) == grafana_port and m.group(2) in boards, (r["alert"], r["annotations"]["dashboard"])


def test_every_metric_karn_exports_is_on_a_dashboard():
    shown = {n for board in dashboards().values() for _, expr in prom_exprs(board) for n in metric_names(expr)}
    for r in reversed(recordings()):  # a recording rule on a dashboard shows the series it reads
        if r["record"] in shown:
            shown |= metric_names(r["expr"])
    missing = {m.prometheus_name for m in reg.METRICS if not set(m.prometheus_series) & shown}
    assert not missing, f"metrics in karn_otel/metrics_registry.py that no dashboard plots: {sorted(missing)}"


def test_ranks_dashboard_reads_the_recording_rules_not_every_ranks_series():
    """Job-wide panels query run:* rules; raw per-rank series only for the picked ranks ($rank), the
    job-wide series (scope="job"), or a query that returns only exceptional ranks (missing ones)."""
    board = dashboards()["karn-ranks"]
    rows = [i for i, p in enumerate(board["panels"]) if p["type"] == "row"]
    titles = [board["panels"][i]["title"] for i in rows]
    start = rows[[t.startswith("Job-wide") for t in titles].index(True)]
    end = rows[[t.startswith("Per rank") for t in titles].index(True)]
    job_wide = board["panels"][start + 1 : end]
    assert job_wide and all(p["type"] != "row" for p in job_wide)
    raw_ok = {
        "Missing ranks": "the KarnRankMissing expression: only the ranks that vanished",
        "run_id": "the Run picker (label values from the series index)",
        "rank": "the Rank picker (label values from the series index)",
    }
    for title, expr in prom_exprs(board):
        for name in karn_metric_names(expr) - RECORDED:
            sels = re.findall(rf"(?<![\w:]){re.escape(name)}(?![\w:])(\{{[^}}]*\}})?", expr)
            for sel in sels:
                assert 'rank=~"$rank"' in sel or 'scope="job"' in sel or title in raw_ok, (title, name, sel)
    for p in job_wide:
        if p["title"] in raw_ok or p["title"] == "Firing alerts":
            continue
        for t in p["targets"]:
            names = karn_metric_names(t["expr"])
            job_series = 'scope="job"' in t["expr"]  # one series per run, exported by rank 0
            assert names & RECORDED or job_series, (p["title"], t["expr"])
    by_title = {p["title"]: p for p in board["panels"]}
    for title, metric, ops in (
        ("Train loss across ranks", "karn_host_train_loss", ""),
        ("Validation accuracy across ranks", "karn_host_val_accuracy", ""),
        ("Host grad norm across ranks", "karn_host_grad_norm", ""),
        ("Epoch time across ranks", "karn_epoch_duration_seconds", f"_mean{stack_rules.RANK_WINDOW}"),
    ):
        exprs = {t["expr"] for t in by_title[title]["targets"]}
        for op in ("max", "min", "avg", "median", "spread"):
            assert f'run:{metric}:{op}{ops}{{run_id=~"$run_id"}}' in exprs, (title, op)


def test_worst_ranks_table_is_the_generators_query_with_rank_as_a_column():
    [panel] = [p for p in dashboards()["karn-ranks"]["panels"] if p["title"] == "Worst ranks"]
    assert panel["type"] == "table"
    [target] = panel["targets"]
    assert target["expr"] == stack_rules.worst_ranks_expr()
    assert target["instant"] and target["format"] == "table"
    [organize] = [t for t in panel["transformations"] if t["id"] == "organize"]
    excluded = {k for k, v in organize["options"]["excludeByName"].items() if v}
    assert {"rank", "measure"}.isdisjoint(excluded) and "Time" in excluded
    assert organize["options"]["indexByName"]["rank"] < organize["options"]["indexByName"]["Value"]
    for s in stack_rules.spreads():
        assert f'"measure", "{s.title}"' in target["expr"]


def test_dashboards_show_the_health_monitors_thresholds():
    """Threshold lines on the policy and gradient panels are HealthThresholds' defaults."""
    boards = dashboards()

    def steps(uid: str, title: str) -> list[float]:
        [panel] = [p for p in boards[uid]["panels"] if p["title"] == title]
        return [s["value"] for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"] if s["value"] is not None]

    assert steps("karn-policy", "Entropy per head") == [T.entropy_collapse_nats]
    assert steps("karn-policy", "Approx KL per update") == [T.kl_too_low, T.kl_too_high]
    assert steps("karn-policy", "Explained variance") == [T.explained_variance_min]
    assert steps("karn-policy", "Value collapse ratio Var(V)/Var(R)") == [T.value_collapse_ratio]
    assert steps("karn-policy", "LSTM saturation") == [T.lstm_saturation_fraction]
    assert steps("karn-gradients", "Isolation leakage") == [T.isolation_leakage_epsilon]


def test_stage_timeline_maps_every_seed_stage():
    [panel] = [p for p in dashboards()["karn-training"]["panels"] if p["title"] == "Seed stage per slot"]
    expr = panel["targets"][0]["expr"]
    mapping = panel["fieldConfig"]["defaults"]["mappings"][0]["options"]
    for i, stage in enumerate(SeedStage):
        assert f'stage="{stage.value}"}} == 1) * {i}' in expr
        assert mapping[str(i)]["text"] == stage.value


def test_dense_windows_link_to_their_tempo_traces():
    """The Tempo queries use the span name and resource attribute the OTel sink writes."""
    sink_source = (REPO / "karn_otel" / "sinks" / "otel" / "traces.py").read_text()
    from karn_otel.config import KarnConfig
    from karn_otel.sinks.otel import build_resource, trace_id_for_episode

    resource = build_resource(KarnConfig(), "run-x", 0, 1).attributes
    board = dashboards()["karn-gradients"]
    tempo_targets = [t for p in board["panels"] for t in p.get("targets", []) if t["datasource"]["uid"] == "karn-tempo"]
    queries = [t["query"] for t in tempo_targets]
    dense = [q for q in queries if "karn.dense_window" in q]
    assert dense and '"karn.dense_window"' in sink_source
    for q in dense:
        for attr in re.findall(r"resource\.([\w.]+)", q):
            assert attr in resource, attr
    assert "${episode_id}" in queries, "the episode trace panel looks the episode id up as a trace id"
    episode = "0123456789abcdef0123456789abcdef"
    assert f"{trace_id_for_episode(episode):032x}" == episode, "a uuid4().hex episode id is its trace id"
    annotations = {a["name"]: a for a in board["annotations"]["list"]}
    assert "karn_telemetry_dense_windows_total" in annotations["Dense-trace windows"]["expr"]
    # The dense-window panel links to the same Tempo search in Explore.
    import urllib.parse

    [link] = [lk for p in board["panels"] for lk in p.get("links", []) if "/explore" in lk["url"]]
    panes = json.loads(
        urllib.parse.unquote(urllib.parse.parse_qs(urllib.parse.urlsplit(link["url"]).query)["panes"][0])
    )
    [pane] = panes.values()
    assert pane["datasource"] in provisioned() and provisioned()[pane["datasource"]]["type"] == "tempo"
    assert [q["query"].replace("${run_id}", "$run_id") for q in pane["queries"]] == dense


# --------------------------------------------------------------------------- Grafana provisioning


def test_datasources_have_fixed_uids_and_linked_traces():
    ds = provisioned()
    assert {"karn-prometheus", "karn-tempo", "karn-alertmanager"} <= set(ds)
    assert ds["karn-prometheus"]["type"] == "prometheus" and ds["karn-prometheus"]["url"] == "http://prometheus:9090"
    assert ds["karn-tempo"]["type"] == "tempo"
    assert (
        ds["karn-alertmanager"]["type"] == "alertmanager"
        and ds["karn-alertmanager"]["url"] == "http://alertmanager:9093"
    )
    prom = ds["karn-prometheus"]["jsonData"]
    assert prom["exemplarTraceIdDestinations"][0]["datasourceUid"] == "karn-tempo"
    assert prom["alertmanagerUid"] == "karn-alertmanager"
    t2m = ds["karn-tempo"]["jsonData"]["tracesToMetrics"]
    assert t2m["datasourceUid"] == "karn-prometheus"
    from karn_otel.config import KarnConfig
    from karn_otel.sinks.otel import build_resource

    resource = build_resource(KarnConfig(), "run-x", 0, 1).attributes
    for tag in t2m["tags"]:
        assert tag["key"] in resource and tag["value"] in reg.COMMON_LABELS, tag
    for q in t2m["queries"]:
        assert "{$$__tags}" in q["query"], "Grafana expands $VAR in provisioning files: write $$__tags"
        assert karn_metric_names(q["query"].replace("$$__tags", "")) <= PROM_NAMES, q
    # Tempo's URL is its HTTP port.
    assert ds["karn-tempo"]["url"].endswith(f":{load_yaml(TEMPO)['server']['http_listen_port']}")


def test_dashboard_provider_reads_the_mounted_dashboards():
    [provider] = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert provider["type"] == "file"
    grafana = load_yaml(COMPOSE)["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./dashboards"] == provider["options"]["path"]
    assert mounts["./stack/grafana/provisioning"] == "/etc/grafana/provisioning"


# --------------------------------------------------------------------------- docker-compose.yml


def test_compose_images_are_pinned():
    services = load_yaml(COMPOSE)["services"]
    assert REQUIRED_SERVICES <= set(services)
    for name, svc in services.items():
        image = svc["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag, f"{name}: image {image} has no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{name}: image {image} is not pinned"


def test_compose_publishes_ports_on_loopback_only():
    for name, svc in load_yaml(COMPOSE)["services"].items():
        for port in svc.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: {port}"


def test_compose_mounts_exist_and_configs_are_read_only():
    services = load_yaml(COMPOSE)["services"]
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            parts = volume.split(":")
            if parts[0].startswith("./"):
                assert (REPO / parts[0]).exists(), f"{name}: {parts[0]} does not exist"
                assert parts[-1] == "ro", f"{name}: {volume} should be read-only"
    mounted = {v.split(":")[0] for s in services.values() for v in s.get("volumes", [])}
    for path in (
        "./collector-config/otel-collector.yaml",
        "./stack/prometheus",
        "./stack/alertmanager",
        "./stack/tempo/tempo.yaml",
        "./stack/grafana/provisioning",
        "./dashboards",
    ):
        assert path in mounted, path


def test_compose_grafana_admin_password_comes_from_the_environment():
    env = load_yaml(COMPOSE)["services"]["grafana"]["environment"]
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?.+\}", env["GF_SECURITY_ADMIN_PASSWORD"])
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert "GF_AUTH_ANONYMOUS_ORG_ROLE" not in env


def test_compose_wires_the_services_together():
    services = load_yaml(COMPOSE)["services"]
    prom_cmd = " ".join(services["prometheus"]["command"])
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom_cmd
    assert "host.docker.internal:host-gateway" in services["prometheus"]["extra_hosts"]
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in " ".join(services["alertmanager"]["command"])
    assert "-config.file=/etc/tempo/tempo.yaml" in services["tempo"]["command"]
    assert "--config=/etc/otelcol-contrib/config.yaml" in services["otel-collector"]["command"]


# --------------------------------------------------------------------------- the Collector

COLLECTOR_VERSION = "0.111.0"
# Component types of otelcol-contrib 0.111.0 that a Karn stack may use (a subset of the distribution).
KNOWN_COMPONENTS = {
    "receivers": {"otlp", "prometheus", "hostmetrics"},
    "processors": {
        "batch",
        "memory_limiter",
        "transform",
        "filter",
        "attributes",
        "resource",
        "resourcedetection",
        "metricstransform",
        "cumulativetodelta",
        "deltatocumulative",
        "groupbyattrs",
        "k8sattributes",
    },
    "exporters": {"otlp", "otlphttp", "prometheus", "prometheusremotewrite", "debug", "file"},
    "extensions": {"health_check", "pprof", "zpages"},
    "connectors": {"spanmetrics", "servicegraph", "forward", "count"},
}


def test_collector_image_is_the_version_its_components_were_checked_against():
    image = load_yaml(COMPOSE)["services"]["otel-collector"]["image"]
    assert image == f"otel/opentelemetry-collector-contrib:{COLLECTOR_VERSION}"


def test_collector_config_components_and_pipelines():
    cfg = load_yaml(COLLECTOR)
    defined = {kind: set(cfg.get(kind) or {}) for kind in KNOWN_COMPONENTS}
    for kind, names in defined.items():
        for name in names:
            assert name.split("/")[0] in KNOWN_COMPONENTS[kind], f"{kind}: unknown component {name}"
    service = cfg["service"]
    assert set(service.get("extensions", [])) == defined["extensions"]
    used: dict[str, set] = {k: set() for k in ("receivers", "processors", "exporters")}
    pipelines = service["pipelines"]
    assert {"traces", "metrics"} <= set(pipelines)
    for name, p in pipelines.items():
        assert name.split("/")[0] in ("traces", "metrics", "logs")
        for kind in used:
            for comp in p.get(kind, []):
                assert comp in defined[kind], f"pipeline {name}: {comp} is not defined under {kind}"
                used[kind].add(comp)
        assert p["receivers"] and p["exporters"]
        assert p["processors"][0] == "memory_limiter" and p["processors"][-1] == "batch", name
    for kind in used:
        assert used[kind] == defined[kind], f"defined but unused {kind}: {defined[kind] - used[kind]}"
    assert pipelines["metrics"]["exporters"] == ["prometheusremotewrite"]
    assert pipelines["traces"]["exporters"] == ["otlp/tempo"]


def test_collector_endpoints_agree_with_prometheus_tempo_and_compose():
    cfg = load_yaml(COLLECTOR)
    protocols = cfg["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317" and protocols["http"]["endpoint"] == "0.0.0.0:4318"
    rw = cfg["exporters"]["prometheusremotewrite"]
    assert rw["resource_to_telemetry_conversion"]["enabled"] is True
    assert rw["endpoint"] == "http://prometheus:9090/api/v1/write", "Prometheus' remote-write receiver"
    services = load_yaml(COMPOSE)["services"]
    assert "--web.enable-remote-write-receiver" in services["prometheus"]["command"]
    own = cfg["service"]["telemetry"]["metrics"]["address"].rsplit(":", 1)[1]
    jobs = {j["job_name"]: j for j in load_yaml(PROMETHEUS_YML)["scrape_configs"]}
    assert jobs["otel-collector"]["static_configs"][0]["targets"] == [f"otel-collector:{own}"]
    tempo = cfg["exporters"]["otlp/tempo"]
    host, tport = tempo["endpoint"].split(":")
    assert host in load_yaml(COMPOSE)["services"]
    assert load_yaml(TEMPO)["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(f":{tport}")
    published = load_yaml(COMPOSE)["services"]["otel-collector"]["ports"]
    assert "127.0.0.1:4317:4317" in published and "127.0.0.1:4318:4318" in published


def collector_prometheus_name(name: str, unit: str, kind: str) -> str:
    """The name otelcol-contrib's Prometheus exporter gives a metric (pkg/translator/prometheus, normalizeName)."""
    unit_map = {"s": "seconds", "ms": "milliseconds", "By": "bytes", "1": "", "%": "percent"}
    tokens = [t for t in re.split(r"[^a-zA-Z0-9]+", name) if t]
    main = unit.split("/", 1)[0].strip()
    if main and not re.search(r"[{}]", main):
        suffix = unit_map.get(main, main)
        if suffix and suffix not in tokens:
            tokens.append(suffix)
    if kind == "counter":  # a monotonic sum
        tokens = [t for t in tokens if t != "total"] + ["total"]
    if unit == "1" and kind == "gauge":
        tokens = [t for t in tokens if t != "ratio"] + ["ratio"]
    return "_".join(tokens)


def test_collector_gives_karns_metrics_the_embedded_endpoints_names():
    """With the transform (unit "1" -> ""), every name matches the registry's; without it gauges get _ratio."""
    statements = load_yaml(COLLECTOR)["processors"]["transform/karn_prometheus_names"]["metric_statements"]
    assert statements == [{"context": "metric", "statements": ['set(unit, "") where unit == "1"']}]
    for m in reg.METRICS:
        unit = "" if m.unit == "1" else m.unit
        assert collector_prometheus_name(m.name, unit, m.kind) == m.prometheus_name, m.name
    ratio = [m for m in reg.METRICS if collector_prometheus_name(m.name, m.unit, m.kind) != m.prometheus_name]
    assert ratio and all(m.unit == "1" and m.kind == "gauge" for m in ratio)


def test_the_stack_watches_itself():
    """Prometheus scrapes the Collector's, Tempo's, Alertmanager's and its own metrics; the Watchdog fires."""
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in load_yaml(PROMETHEUS_YML)["scrape_configs"]}
    assert jobs["otel-collector"] == ["otel-collector:8888"]
    assert jobs["tempo"] == [f"tempo:{load_yaml(TEMPO)['server']['http_listen_port']}"]
    assert jobs["alertmanager"] == ["alertmanager:9093"]
    assert jobs["prometheus"] == ["localhost:9090"]
    assert "KarnWatchdog" in {r["alert"] for r in rules()}


def test_compose_services_are_healthy_before_their_dependents_start():
    services = load_yaml(COMPOSE)["services"]
    one_shot = {
        n
        for s in services.values()
        for n, d in (s.get("depends_on") or {}).items()
        if isinstance(d, dict) and d.get("condition") == "service_completed_successfully"
    }
    for name, svc in services.items():
        if name in one_shot:
            continue
        check = svc.get("healthcheck")
        assert check and check["test"][0] == "CMD", f"{name}: no healthcheck"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert isinstance(cond, dict), f"{name}: depends_on {dep} without a condition"
            want = "service_completed_successfully" if dep in one_shot else "service_healthy"
            assert cond["condition"] == want, (name, dep)
    assert services["grafana"]["depends_on"].keys() >= {"prometheus", "tempo", "alertmanager"}
    assert services["otel-collector"]["depends_on"].keys() >= {"prometheus", "tempo"}, "it writes into both"


def test_collector_memory_is_bounded():
    """memory_limiter in absolute MiB under the container's limit, and GOMEMLIMIT at the limiter's limit."""
    limiter = load_yaml(COLLECTOR)["processors"]["memory_limiter"]
    svc = load_yaml(COMPOSE)["services"]["otel-collector"]
    mem_limit_mib = int(svc["mem_limit"].removesuffix("m"))
    assert limiter["limit_mib"] + limiter["spike_limit_mib"] <= mem_limit_mib
    assert svc["environment"]["GOMEMLIMIT"] == f"{limiter['limit_mib']}MiB"


def test_prometheus_is_pinned_with_the_remote_write_and_otlp_receivers():
    svc = load_yaml(COMPOSE)["services"]["prometheus"]
    assert svc["image"] == "prom/prometheus:v2.54.1"
    assert "--web.enable-remote-write-receiver" in svc["command"]
    assert "--enable-feature=otlp-write-receiver" in svc["command"]


def test_tempo_config():
    cfg = load_yaml(TEMPO)
    assert cfg["storage"]["trace"]["backend"] == "local"
    protocols = cfg["distributor"]["receivers"]["otlp"]["protocols"]
    assert {"grpc", "http"} <= set(protocols)
    volumes = load_yaml(COMPOSE)["services"]["tempo"]["volumes"]
    data = [v for v in volumes if not v.startswith("./")]
    assert data and all(cfg["storage"]["trace"][k]["path"].startswith(data[0].split(":")[1]) for k in ("wal", "local"))


def test_docs_describe_the_stack():
    text = (REPO / "docs" / "stack.md").read_text()
    for needle in (
        "docker compose up",
        "GRAFANA_ADMIN_PASSWORD",
        "--otlp-endpoint",
        "--prometheus-port",
        "stack_rules",
        "karn-recording.yml",
        "Worst ranks",
        *sorted(REQUIRED_ALERTS),
        *sorted(RECORDED),
    ):
        assert needle in text, needle
