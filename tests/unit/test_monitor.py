"""Loom's Prometheus rules and dashboards, checked by Prometheus' own promtool."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster.config import MonitorConfig
from cluster.monitor import alert_rules, dashboard_queries, dashboards, prometheus_command, write_files
from cluster.recipe import ConfigError, load_config
from tests.conftest import TINY
from tests.helpers import system_tool

CASES = Path(__file__).with_name("promtool") / "loom_rules_test.yml"


def promtool(*args: str, cwd: Path) -> str:
    result = subprocess.run([system_tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_rules_and_config_pass_promtool_check(tmp_path):
    files = write_files(MonitorConfig(), tmp_path, discovery=tmp_path / "discovery.json")
    assert "SUCCESS: 12 rules found" in promtool("check", "rules", str(files.rules), cwd=tmp_path)
    assert "is valid prometheus config file syntax" in promtool("check", "config", str(files.config), cwd=tmp_path)


def test_every_alert_fires_and_stays_quiet_in_promtool_unit_tests(tmp_path):
    write_files(MonitorConfig(), tmp_path)
    shutil.copy(CASES, tmp_path)
    promtool("test", "rules", CASES.name, cwd=tmp_path)

    cases = [case for group in yaml.safe_load(CASES.read_text())["tests"] for case in group.get("alert_rule_test", [])]
    for rule in alert_rules(MonitorConfig()):
        expected = [case["exp_alerts"] for case in cases if case["alertname"] == rule["alert"]]
        assert any(expected) and [] in expected, f"{rule['alert']}: needs a firing and a quiet case"


def test_the_rules_follow_the_recipes_monitor_section(tmp_path):
    write_files(MonitorConfig(latency_p99_slo_s=2.0), tmp_path)
    shutil.copy(CASES, tmp_path)
    result = subprocess.run(
        [system_tool("promtool"), "test", "rules", CASES.name], cwd=tmp_path, capture_output=True, text=True
    )
    # With a 2 s SLO the 0.5-1 s model no longer breaks it, and the case expecting the alert fails.
    assert (
        result.returncode == 1 and "alertname: LoomServeLatencyP99OverSLO, time: 10m" in result.stdout + result.stderr
    )


def test_every_dashboard_query_is_valid_promql(tmp_path):
    boards = dashboards()
    assert set(boards) == {"loom_serve", "loom_train", "loom_data", "loom_eval"}
    # promtool parses expressions only inside rules: each query becomes a recording rule.
    queries = [expr for board in boards.values() for _, expr in dashboard_queries(board)]
    rules = {"groups": [{"name": "q", "rules": [{"record": f"q{i}", "expr": e} for i, e in enumerate(queries)]}]}
    (tmp_path / "queries.yml").write_text(yaml.safe_dump(rules))
    assert f"SUCCESS: {len(queries)} rules found" in promtool("check", "rules", "queries.yml", cwd=tmp_path)


def test_prometheus_listens_on_loopback_unless_authenticated(tmp_path):
    command = prometheus_command(MonitorConfig(port=9191), write_files(MonitorConfig(), tmp_path))
    assert "--web.listen-address=127.0.0.1:9191" in command
    with pytest.raises(ConfigError) as refused:
        load_config(TINY, ["monitor.host=0.0.0.0"])
    assert "monitor.web_config_file" in str(refused.value)
    open_but_authenticated = load_config(
        TINY, ["monitor.host=0.0.0.0", "monitor.web_config_file=/etc/prometheus/web.yml"]
    )
    assert "--web.config.file=/etc/prometheus/web.yml" in prometheus_command(
        open_but_authenticated.monitor, write_files(open_but_authenticated.monitor, tmp_path)
    )
