"""``loom dashboards push``: Loom's and Ray's dashboards, and Loom's alert rules, into a Grafana, idempotently.

Through ``grafana-client`` (Grafana's HTTP API): the Prometheus data source that ``loom monitor``
runs, a "Loom" folder with the serve, train and data dashboards, a "Ray" folder with the dashboards
Ray generates in its session directory, and the alert rules of ``cluster.monitor`` as
Grafana-managed rules. Everything has a fixed uid, so a second push updates what the first made.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cluster.config import LOOPBACK_HOSTS, MonitorConfig
from cluster.monitor import alert_rules, dashboards

DATASOURCE_UID = "loom-prometheus"
LOOM_FOLDER = ("loom", "Loom")
RAY_FOLDER = ("loom-ray", "Ray")
RULE_GROUP = "loom"


class GrafanaPushError(RuntimeError):
    pass


@dataclass
class PushSummary:
    datasource: str = ""
    folders: list[str] = field(default_factory=list)
    dashboards: list[str] = field(default_factory=list)
    alert_rules: list[str] = field(default_factory=list)


def check_url(url: str) -> None:
    """A token sent in clear beyond this machine is a leaked token: HTTPS, or loopback."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise GrafanaPushError(f"--grafana-url {url!r}: expected http(s)://host[:port]")
    if parsed.scheme == "http" and parsed.hostname not in LOOPBACK_HOSTS:
        raise GrafanaPushError(
            f"--grafana-url {url!r}: use https beyond loopback (the credential would travel in clear)"
        )


def ray_dashboards(folder: Path) -> dict[str, dict[str, Any]]:
    """The dashboards Ray wrote for its session (``<session>/metrics/grafana/dashboards``), by file stem."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def datasource_body(prometheus_url: str) -> dict[str, Any]:
    return {
        "uid": DATASOURCE_UID,
        "name": "Loom Prometheus",
        "type": "prometheus",
        "access": "proxy",
        "url": prometheus_url,
        "isDefault": False,
        "jsonData": {"httpMethod": "POST"},
    }


def _rule_uid(alert: str) -> str:
    # Grafana's rule uids: at most 40 of letters, digits, '-' and '_'.
    return ("loom-" + re.sub(r"(?<!^)(?=[A-Z])", "-", alert).lower())[:40]


def grafana_alert_rule(rule: dict[str, Any], folder_uid: str) -> dict[str, Any]:
    """A Prometheus alerting rule as a Grafana-managed one (provisioning API's ProvisionedAlertRule).

    The Prometheus expression returns one series per firing label set, whatever its value (a stalled
    run's value is 0): query A maps each to 1, B takes its last value and C fires above 0."""
    return {
        "uid": _rule_uid(rule["alert"]),
        "title": rule["alert"],
        "ruleGroup": RULE_GROUP,
        "folderUID": folder_uid,
        "condition": "C",
        "for": rule["for"],
        "noDataState": "OK",  # no series: nothing breaks the bound
        "execErrState": "Error",
        "labels": rule["labels"],
        "annotations": rule["annotations"],
        "data": [
            {
                "refId": "A",
                "datasourceUid": DATASOURCE_UID,
                "relativeTimeRange": {"from": 600, "to": 0},
                "model": {"refId": "A", "expr": f"({rule['expr']}) * 0 + 1", "instant": True},
            },
            {
                "refId": "B",
                "datasourceUid": "__expr__",
                "model": {"refId": "B", "type": "reduce", "expression": "A", "reducer": "last"},
            },
            {
                "refId": "C",
                "datasourceUid": "__expr__",
                "model": {
                    "refId": "C",
                    "type": "threshold",
                    "expression": "B",
                    "conditions": [{"evaluator": {"type": "gt", "params": [0]}}],
                },
            },
        ],
    }


def _exists(get: Callable[[], Any]) -> bool:
    """Whether Grafana has the object ``get`` reads (its API answers 404 when not); other errors propagate."""
    from grafana_client.client import GrafanaClientError

    try:
        get()
    except GrafanaClientError as err:
        if getattr(err, "status_code", None) != 404:
            raise
        return False
    return True


def _upsert_datasource(api, body: dict[str, Any]) -> None:
    if _exists(lambda: api.datasource.get_datasource_by_uid(body["uid"])):
        api.datasource.update_datasource_by_uid(body["uid"], body)
    else:
        api.datasource.create_datasource(body)


def _ensure_folder(api, uid: str, title: str) -> None:
    if not _exists(lambda: api.folder.get_folder(uid)):
        api.folder.create_folder(title, uid=uid)


def _upsert_dashboard(api, dashboard: dict[str, Any], folder_uid: str) -> str:
    body = copy.deepcopy(dashboard)
    body["id"] = None  # matched by uid: a numeric id from another Grafana would clash
    api.dashboard.update_dashboard(
        {"dashboard": body, "folderUid": folder_uid, "overwrite": True, "message": "loom dashboards push"}
    )
    return body["uid"]


def _upsert_alert_rule(api, rule: dict[str, Any]) -> None:
    if _exists(lambda: api.alertingprovisioning.get_alertrule(rule["uid"])):
        api.alertingprovisioning.update_alertrule(rule["uid"], rule)
    else:
        api.alertingprovisioning.create_alertrule(rule)


def credential_from_env(environ: Mapping[str, str]) -> str | tuple[str, str]:
    """GRAFANA_TOKEN (a service-account token), else GRAFANA_USER and GRAFANA_PASSWORD: never argv."""
    if token := environ.get("GRAFANA_TOKEN"):
        return token
    user, password = environ.get("GRAFANA_USER"), environ.get("GRAFANA_PASSWORD")
    if user and password:
        return user, password
    raise GrafanaPushError("set GRAFANA_TOKEN (a service-account token), or GRAFANA_USER and GRAFANA_PASSWORD")


def push(api, prometheus_url: str, monitor: MonitorConfig, ray_dashboards_dir: Path | None) -> PushSummary:
    """Create or update the data source, the folders, the dashboards and the alert rules."""
    summary = PushSummary()
    _upsert_datasource(api, datasource_body(prometheus_url))
    summary.datasource = DATASOURCE_UID
    folders = [(LOOM_FOLDER, dashboards())]
    if ray_dashboards_dir is not None and ray_dashboards_dir.is_dir():
        folders.append((RAY_FOLDER, ray_dashboards(ray_dashboards_dir)))
    for (uid, title), boards in folders:
        _ensure_folder(api, uid, title)
        summary.folders.append(uid)
        summary.dashboards += [_upsert_dashboard(api, board, uid) for board in boards.values()]
    for rule in alert_rules(monitor):
        grafana_rule = grafana_alert_rule(rule, LOOM_FOLDER[0])
        _upsert_alert_rule(api, grafana_rule)
        summary.alert_rules.append(grafana_rule["uid"])
    return summary
