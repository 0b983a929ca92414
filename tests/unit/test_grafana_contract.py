"""Contract test of `loom dashboards push` against Grafana's documented HTTP API.

No Grafana server can be installed on these machines. The push runs through the real
grafana-client against a stand-in that answers as Grafana's HTTP API reference documents
(data sources, folders, dashboards, alerting provisioning: status codes and bodies), and checks
every body against the schemas in tests/grafana_schema.py. With GRAFANA_URL (and GRAFANA_TOKEN)
set, the last test pushes to that real Grafana instead.
"""

from __future__ import annotations

import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonschema
import pytest

from cluster.cli import main
from cluster.config import MonitorConfig
from cluster.grafana import DATASOURCE_UID, LOOM_FOLDER, RAY_FOLDER, push
from cluster.monitor import alert_rules, dashboards
from tests import grafana_schema as schema

TOKEN = "glsa_contract-test-token-0123456789"


class GrafanaStandIn(ThreadingHTTPServer):
    """Grafana's documented answers for the routes Loom uses, with its state in memory."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.datasources: dict[str, dict] = {}
        self.folders: dict[str, dict] = {}
        self.dashboards: dict[str, dict] = {}
        self.rules: dict[str, dict] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Authorization header
        self.errors: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: GrafanaStandIn

    def log_message(self, *args) -> None:  # quiet
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self, body_schema: dict) -> dict | None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        try:
            jsonschema.validate(body, body_schema)
        except jsonschema.ValidationError as err:
            self.server.errors.append(f"{self.command} {self.path}: {err.message}")
            self._reply(400, {"message": f"bad request data: {err.message}"})
            return None
        return body

    def _route(self) -> None:
        server, path, method = self.server, self.path.split("?")[0], self.command
        server.requests.append((method, path, self.headers.get("Authorization")))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._reply(401, {"message": "Unauthorized"})
        if found := re.fullmatch(r"/api/datasources/uid/([^/]+)", path):
            uid = found.group(1)
            if uid not in server.datasources:
                return self._reply(404, {"message": "Data source not found"})
            if method == "GET":
                return self._reply(200, server.datasources[uid])
            if method == "PUT" and (body := self._body(schema.DATASOURCE)) is not None:
                server.datasources[uid] = {**server.datasources[uid], **body}
                return self._reply(200, {"message": "Datasource updated", "datasource": server.datasources[uid]})
        elif path == "/api/datasources" and method == "POST":
            if (body := self._body(schema.DATASOURCE)) is None:
                return
            if any(ds["name"] == body["name"] for ds in server.datasources.values()):
                return self._reply(409, {"message": "data source with the same name already exists"})
            stored = {**body, "id": len(server.datasources) + 1}
            server.datasources[body["uid"]] = stored
            return self._reply(200, {"datasource": stored, "id": stored["id"], "message": "Datasource added"})
        elif (found := re.fullmatch(r"/api/folders/([^/]+)", path)) and method == "GET":
            folder = server.folders.get(found.group(1))
            return self._reply(200, folder) if folder else self._reply(404, {"message": "folder not found"})
        elif path == "/api/folders" and method == "POST":
            if (body := self._body(schema.FOLDER)) is None:
                return
            if body.get("uid") in server.folders:
                return self._reply(409, {"message": "a folder with the same uid already exists"})
            server.folders[body["uid"]] = {**body, "id": len(server.folders) + 1}
            return self._reply(200, server.folders[body["uid"]])
        elif path == "/api/dashboards/db" and method == "POST":
            if (body := self._body(schema.DASHBOARD_SAVE)) is None:
                return
            board = body["dashboard"]
            if body.get("folderUid") not in server.folders:
                return self._reply(400, {"message": "folder not found"})
            previous = server.dashboards.get(board.get("uid"))
            if previous and not body.get("overwrite"):
                return self._reply(412, {"status": "name-exists", "message": "A dashboard with the same uid exists"})
            version = previous["version"] + 1 if previous else 1
            server.dashboards[board["uid"]] = {"dashboard": board, "folderUid": body["folderUid"], "version": version}
            return self._reply(200, {"status": "success", "uid": board["uid"], "version": version})
        elif (found := re.fullmatch(r"/api/v1/provisioning/alert-rules(?:/([^/]+))?", path)) is not None:
            uid = found.group(1)
            if method == "GET" and uid:
                rule = server.rules.get(uid)
                return self._reply(200, rule) if rule else self._reply(404, {"message": "rule not found"})
            if (body := self._body(schema.ALERT_RULE)) is None:
                return
            known = {*server.datasources, "__expr__"}
            if body["folderUID"] not in server.folders or any(q["datasourceUid"] not in known for q in body["data"]):
                return self._reply(400, {"message": "invalid alert rule: unknown folder or data source"})
            if method == "POST" and not uid:
                if body["uid"] in server.rules:
                    return self._reply(409, {"message": "a rule with this uid already exists"})
                server.rules[body["uid"]] = body
                return self._reply(201, body)
            if method == "PUT" and uid:
                if uid not in server.rules:
                    return self._reply(404, {"message": "rule not found"})
                server.rules[uid] = body
                return self._reply(200, body)
        return self._reply(404, {"message": f"no such route in this stand-in: {method} {path}"})

    do_GET = do_POST = do_PUT = _route


@pytest.fixture
def grafana():
    server = GrafanaStandIn()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def ray_dashboards_dir(tmp_path) -> Path:
    """Dashboards as Ray writes them into its session directory, from Ray's own generator."""
    from ray.dashboard.modules.metrics import grafana_dashboard_factory as factory

    folder = tmp_path / "ray-dashboards"
    folder.mkdir()
    for name in ("default", "serve", "train", "data"):
        content, _ = getattr(factory, f"generate_{name}_grafana_dashboard")()
        (folder / f"{name}_grafana_dashboard.json").write_text(content)
    return folder


def _api(url: str):
    from grafana_client import GrafanaApi

    return GrafanaApi.from_url(url, credential=TOKEN)


def test_contract_push_creates_everything_then_updates_it_in_place(grafana, ray_dashboards_dir):
    first = push(_api(grafana.url), "http://127.0.0.1:9090", MonitorConfig(), ray_dashboards_dir)

    assert not grafana.errors, grafana.errors
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in grafana.requests)
    assert grafana.datasources[DATASOURCE_UID]["url"] == "http://127.0.0.1:9090"
    assert set(grafana.folders) == {LOOM_FOLDER[0], RAY_FOLDER[0]} == set(first.folders)
    loom_uids = {board["uid"] for board in dashboards().values()}
    assert {"loom-serve", "loom-train", "loom-data", "loom-eval"} == loom_uids
    assert all(grafana.dashboards[uid]["folderUid"] == LOOM_FOLDER[0] for uid in loom_uids)
    ray_uids = set(grafana.dashboards) - loom_uids
    assert len(ray_uids) == 4 and all(grafana.dashboards[uid]["folderUid"] == RAY_FOLDER[0] for uid in ray_uids)
    assert {rule["title"] for rule in grafana.rules.values()} == {
        rule["alert"] for rule in alert_rules(MonitorConfig())
    }
    # Each rule's query is the Prometheus alert expression, against the data source just made.
    stalled = next(rule for rule in grafana.rules.values() if rule["title"] == "LoomTrainStalled")
    assert "changes(ray_loom_train_step[10m])" in stalled["data"][0]["model"]["expr"]
    assert stalled["data"][0]["datasourceUid"] == DATASOURCE_UID

    created = {(method, path) for method, path, _ in grafana.requests if method != "GET"}
    assert ("POST", "/api/datasources") in created and ("POST", "/api/v1/provisioning/alert-rules") in created
    grafana.requests.clear()
    second = push(_api(grafana.url), "http://127.0.0.1:9191", MonitorConfig(), ray_dashboards_dir)

    # The same objects, updated: nothing created twice, dashboards overwritten to version 2.
    assert not grafana.errors, grafana.errors
    assert second.dashboards == first.dashboards and second.alert_rules == first.alert_rules
    assert len(grafana.datasources) == 1 and grafana.datasources[DATASOURCE_UID]["url"] == "http://127.0.0.1:9191"
    assert all(entry["version"] == 2 for entry in grafana.dashboards.values())
    writes = [(method, path) for method, path, _ in grafana.requests if method != "GET"]
    assert ("POST", "/api/datasources") not in writes and ("POST", "/api/folders") not in writes
    assert ("POST", "/api/v1/provisioning/alert-rules") not in writes
    assert writes.count(("PUT", f"/api/datasources/uid/{DATASOURCE_UID}")) == 1


@pytest.mark.parametrize("name", sorted(dashboards()))
def test_every_loom_dashboard_matches_grafanas_dashboard_schema(name):
    board = dashboards()[name]
    jsonschema.validate(board, schema.DASHBOARD)
    # Every panel reads the dashboard's data-source variable, so any Prometheus can be picked.
    assert {v["name"]: v["type"] for v in board["templating"]["list"]}["datasource"] == "datasource"
    assert all(panel["datasource"]["uid"] == "${datasource}" for panel in board["panels"])
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))


def test_the_schema_refuses_a_misspelt_panel_field():
    board = json.loads(json.dumps(dashboards()["loom_serve"]))
    board["panels"][0]["gridpos"] = board["panels"][0].pop("gridPos")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(board, schema.DASHBOARD)


def test_the_cli_takes_the_token_from_the_environment_and_never_prints_it(
    grafana, ray_dashboards_dir, monkeypatch, capsys
):
    monkeypatch.setenv("GRAFANA_TOKEN", TOKEN)
    assert main(["dashboards", "push", "--grafana-url", grafana.url, "--ray-dashboards", str(ray_dashboards_dir)]) == 0
    out, err = capsys.readouterr()
    assert "8 dashboards in folders loom, loom-ray; 7 alert rules" in out and TOKEN not in out + err

    # A token in clear beyond loopback, or no credential at all: refused before any request.
    grafana.requests.clear()
    assert main(["dashboards", "push", "--grafana-url", "http://grafana.example.com"]) == 2
    monkeypatch.delenv("GRAFANA_TOKEN")
    assert main(["dashboards", "push", "--grafana-url", grafana.url]) == 2
    assert "GRAFANA_TOKEN" in capsys.readouterr().err and not grafana.requests


@pytest.mark.skipif(not os.environ.get("GRAFANA_URL"), reason="GRAFANA_URL is not set: no real Grafana to push to")
def test_push_to_a_real_grafana(ray_dashboards_dir):
    from grafana_client import GrafanaApi

    api = GrafanaApi.from_url(os.environ["GRAFANA_URL"], credential=os.environ.get("GRAFANA_TOKEN"))
    summary = push(api, "http://127.0.0.1:9090", MonitorConfig(), ray_dashboards_dir)
    for uid in summary.dashboards:
        assert api.dashboard.get_dashboard(uid)["dashboard"]["uid"] == uid
    for uid in summary.alert_rules:
        assert api.alertingprovisioning.get_alertrule(uid)["uid"] == uid
