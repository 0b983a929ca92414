"""JSON schemas (a subset) of what Loom sends to Grafana, for the contract test.

Written out by hand from Grafana's published types, since no Grafana server can be installed here
and Grafana ships no JSON Schema of its own:
- the dashboard model: grafana-foundation-sdk's ``dashboard.Dashboard``, ``Panel``, ``GridPos``,
  ``DataSourceRef``, ``VariableModel`` and the Prometheus ``dataquery`` (Grafana 11.x, schemaVersion 39);
- the alerting provisioning API's ``ProvisionedAlertRule`` and ``AlertQuery`` (Grafana 12.4 HTTP API
  reference, /api/v1/provisioning/alert-rules);
- ``POST /api/datasources``, ``POST /api/folders`` and ``POST /api/dashboards/db`` bodies (HTTP API
  reference: Data source, Folder and Dashboard APIs).

Only the fields Loom and Ray's dashboards use are listed; unknown ones are refused, so a misspelt
field fails here rather than being dropped silently by Grafana.
"""

from __future__ import annotations

DATASOURCE_REF = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"type": {"type": "string"}, "uid": {"type": "string"}},
}

PROMETHEUS_QUERY = {
    "type": "object",
    "additionalProperties": False,
    "required": ["refId", "expr"],
    "properties": {
        "refId": {"type": "string"},
        "expr": {"type": "string", "minLength": 1},
        "legendFormat": {"type": "string"},
        "datasource": DATASOURCE_REF,
        "hide": {"type": "boolean"},
        "editorMode": {"type": "string"},
        "range": {"type": "boolean"},
        "instant": {"type": "boolean"},
        "exemplar": {"type": "boolean"},
        "format": {"type": "string"},
        "interval": {"type": "string"},
        "intervalFactor": {"type": "number"},
    },
}

GRID_POS = {
    "type": "object",
    "additionalProperties": False,
    "required": ["h", "w", "x", "y"],
    "properties": {
        "h": {"type": "integer", "minimum": 1},
        "w": {"type": "integer", "minimum": 1, "maximum": 24},  # Grafana's grid is 24 columns wide
        "x": {"type": "integer", "minimum": 0, "maximum": 23},
        "y": {"type": "integer", "minimum": 0},
        "static": {"type": "boolean"},
    },
}

PANEL = {
    "type": "object",
    "additionalProperties": False,
    "required": ["type", "id", "title", "gridPos", "targets"],
    "properties": {
        "id": {"type": "integer"},
        "type": {"type": "string", "enum": ["timeseries", "stat", "gauge", "table", "bargauge", "barchart"]},
        "title": {"type": "string", "minLength": 1},
        "description": {"type": "string"},
        "datasource": DATASOURCE_REF,
        "gridPos": GRID_POS,
        "targets": {"type": "array", "minItems": 1, "items": PROMETHEUS_QUERY},
        "fieldConfig": {
            "type": "object",
            "additionalProperties": False,
            "required": ["defaults", "overrides"],
            "properties": {"defaults": {"type": "object"}, "overrides": {"type": "array"}},
        },
        "options": {"type": "object"},
        "transparent": {"type": "boolean"},
        "interval": {"type": "string"},
    },
}

VARIABLE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["type", "name"],
    "properties": {
        "type": {"type": "string", "enum": ["query", "datasource", "custom", "constant", "interval", "textbox"]},
        "name": {"type": "string"},
        "label": {"type": "string"},
        "query": {"type": ["string", "object"]},
        "hide": {"type": "integer", "enum": [0, 1, 2]},
        "description": {"type": "string"},
        "datasource": DATASOURCE_REF,
        "current": {"type": "object"},
        "multi": {"type": "boolean"},
        "includeAll": {"type": "boolean"},
        "options": {"type": "array"},
        "refresh": {"type": "integer"},
        "regex": {"type": "string"},
        "skipUrlSync": {"type": "boolean"},
    },
}

DASHBOARD = {
    "type": "object",
    "additionalProperties": False,
    "required": ["title", "uid", "schemaVersion", "panels"],
    "properties": {
        "id": {"type": ["integer", "null"]},
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "description": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "version": {"type": "integer"},
        "editable": {"type": "boolean"},
        "refresh": {"type": "string"},
        "timezone": {"type": "string"},
        "time": {
            "type": "object",
            "additionalProperties": False,
            "required": ["from", "to"],
            "properties": {"from": {"type": "string"}, "to": {"type": "string"}},
        },
        "templating": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"list": {"type": "array", "items": VARIABLE}},
        },
        "panels": {"type": "array", "minItems": 1, "items": PANEL},
    },
}

DATASOURCE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "type", "access", "url"],
    "properties": {
        "uid": {"type": "string"},
        "name": {"type": "string"},
        "type": {"type": "string"},
        "access": {"type": "string", "enum": ["proxy", "direct"]},
        "url": {"type": "string"},
        "isDefault": {"type": "boolean"},
        "jsonData": {"type": "object"},
        "secureJsonData": {"type": "object"},
    },
}

FOLDER = {
    "type": "object",
    "additionalProperties": False,
    "required": ["title"],
    "properties": {"uid": {"type": "string"}, "title": {"type": "string"}, "parentUid": {"type": "string"}},
}

DASHBOARD_SAVE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["dashboard"],
    "properties": {
        "dashboard": {"type": "object", "required": ["title"]},  # the dashboard itself: DASHBOARD above
        "folderUid": {"type": "string"},
        "message": {"type": "string"},
        "overwrite": {"type": "boolean"},
    },
}

ALERT_QUERY = {
    "type": "object",
    "additionalProperties": False,
    "required": ["refId", "datasourceUid", "model"],
    "properties": {
        "refId": {"type": "string"},
        "datasourceUid": {"type": "string"},
        "queryType": {"type": "string"},
        "relativeTimeRange": {
            "type": "object",
            "additionalProperties": False,
            "required": ["from", "to"],
            "properties": {"from": {"type": "integer", "minimum": 0}, "to": {"type": "integer", "minimum": 0}},
        },
        "model": {"type": "object", "required": ["refId"]},
    },
}

ALERT_RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["title", "ruleGroup", "folderUID", "condition", "data", "for", "noDataState", "execErrState"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "orgID": {"type": "integer"},
        "title": {"type": "string", "minLength": 1},
        "ruleGroup": {"type": "string", "minLength": 1},
        "folderUID": {"type": "string", "minLength": 1},
        "condition": {"type": "string"},
        "data": {"type": "array", "minItems": 1, "items": ALERT_QUERY},
        "for": {"type": "string", "pattern": r"^\d+[smh]$"},
        "noDataState": {"enum": ["Alerting", "NoData", "OK", "KeepLast"]},
        "execErrState": {"enum": ["OK", "Alerting", "Error", "KeepLast"]},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "isPaused": {"type": "boolean"},
    },
}
