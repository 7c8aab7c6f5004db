"""Checks for deploy/monitoring, used by validate.py.

- The metric names the sidecar exposes (METRICS, with their labels): every
  PromQL expression in a PrometheusRule, the Grafana dashboard and the rule
  tests may use only these (and the rules' own recorded series), with known
  label names and, where the values form a closed set, known values.
- ServiceMonitor and PrometheusRule are CRDs that kubernetes-validate has no
  schema for, and the prometheus-operator CRD files are not installable here
  (no package ships them). CRD_SCHEMAS is therefore a strict JSON Schema of
  the fields deploy/ uses, with the names, types, enums, patterns and
  required fields of the prometheus-operator CRDs as of v0.82-v0.84
  (monitoring.coreos.com_servicemonitors.yaml, _prometheusrules.yaml): any
  other field fails, as a misspelled one would (extend the schema from the CRD
  to use a new field).
- promtool (from Debian's prometheus package; PROMTOOL names another binary)
  checks the rules (`promtool check rules`, lint included), runs the unit
  tests in tests/deploy/rules.test.yaml (`promtool test rules`) and parses
  every dashboard query. promql-parser (PyPI) gives the syntax tree for the
  metric, label and Watch checks.
- Latency figures and the rules exclude the Watch stream
  (grpc_type="server_stream"); dashboard panels outside the Watch row too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import jsonschema
import promql_parser
import yaml

HERE = Path(__file__).resolve().parent
RULE_TESTS = HERE / "rules.test.yaml"
DOCUMENT_SERVICE = "docsidecar.v1.DocumentService"

# --------------------------------------------------------------------------
# What the sidecar exposes: name -> (type, label names)

_GRPC = {"grpc_service", "grpc_method", "grpc_type"}
_HANDLED = _GRPC | {"grpc_code", "service", "collection", "client"}
METRICS: dict[str, tuple[str, set[str]]] = {
    "grpc_server_started_total": ("counter", _GRPC),
    "grpc_server_handled_total": ("counter", _HANDLED),
    "grpc_server_handling_seconds": ("histogram", _HANDLED - {"grpc_code"}),
    "docsidecar_requests_in_flight": ("gauge", set()),
    "docsidecar_pool_connections_max": ("gauge", set()),
    "docsidecar_pool_connections_open": ("gauge", set()),
    "docsidecar_pool_connections_idle": ("gauge", set()),
    "docsidecar_pool_waiting": ("gauge", set()),
    "docsidecar_pool_acquire_seconds": ("histogram", set()),
    "docsidecar_database_up": ("gauge", set()),
    "docsidecar_database_errors_total": ("counter", {"kind"}),
    "docsidecar_documents_written_total": ("counter", set()),
    "docsidecar_documents_deleted_total": ("counter", set()),
    "docsidecar_documents_expired_total": ("counter", set()),
    "docsidecar_tls_certificate_expiry_timestamp_seconds": ("gauge", {"certificate"}),
    "docsidecar_tls_handshake_failures_total": ("counter", {"reason"}),
    "docsidecar_connections_open": ("gauge", set()),
    "docsidecar_connections_rejected_total": ("counter", set()),
    "docsidecar_connections_closed_idle_total": ("counter", set()),
    "docsidecar_accept_errors_total": ("counter", set()),
    "docsidecar_pool_acquire_timeouts_total": ("counter", set()),
    "docsidecar_health_checks_total": ("counter", {"result"}),
    "docsidecar_watch_streams_open": ("gauge", set()),
    "docsidecar_watch_events_sent_total": ("counter", set()),
    "docsidecar_watch_lag_seconds": ("gauge", set()),
    "docsidecar_watch_streams_ended_total": ("counter", {"reason"}),
    "docsidecar_build_info": ("gauge", {"version"}),
    "process_resident_memory_bytes": ("gauge", set()),
    "process_cpu_seconds_total": ("counter", set()),
    "process_open_fds": ("gauge", set()),
}
# Labels Prometheus attaches to every scraped series through the ServiceMonitor
# (its `service` target label is dropped: the sidecar has its own).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "endpoint"}
GRPC_CODES = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
              "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
              "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"}
LABEL_VALUES = {
    "grpc_type": {"unary", "server_stream"},
    "grpc_code": GRPC_CODES,
    "kind": {"unavailable", "permission_denied", "internal", "disk_full"},
    "certificate": {"server", "client_ca", "database_ca", "database_client"},
    "result": {"ok", "failed"},
}
# What the alerts must cover: description -> metrics one alert must use.
REQUIRED_ALERTS = {
    "gRPC server-fault ratio": {"grpc_server_handled_total"},
    "p99 latency": {"grpc_server_handling_seconds_bucket"},
    "pool waiting": {"docsidecar_pool_waiting"},
    "pool open == max": {"docsidecar_pool_connections_open", "docsidecar_pool_connections_max"},
    "database unreachable": {"docsidecar_database_up"},
    "certificate expiry": {"docsidecar_tls_certificate_expiry_timestamp_seconds"},
}
# What the dashboard must show.
REQUIRED_DASHBOARD_METRICS = {
    "grpc_server_handled_total", "grpc_server_handling_seconds_bucket", "docsidecar_pool_connections_open",
    "docsidecar_pool_waiting", "docsidecar_database_up", "docsidecar_watch_streams_open",
    "docsidecar_watch_events_sent_total", "docsidecar_watch_lag_seconds", "process_resident_memory_bytes",
    "process_cpu_seconds_total",
}
REQUIRED_DASHBOARD_GROUPINGS = {"grpc_method", "collection"}
SEVERITIES = {"warning", "critical"}


def exposed_series() -> dict[str, set[str]]:
    """Every series name the sidecar exposes, with its labels (histograms expanded)."""
    out: dict[str, set[str]] = {}
    for name, (kind, labels) in METRICS.items():
        if kind == "histogram":
            out[f"{name}_bucket"] = labels | {"le"}
            out[f"{name}_sum"] = set(labels)
            out[f"{name}_count"] = set(labels)
        else:
            out[name] = set(labels)
    return out


EXPOSED = exposed_series()
ALL_LABELS = set().union(*EXPOSED.values()) | TARGET_LABELS

# --------------------------------------------------------------------------
# CRD schemas: the used subset, strict


_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
_LABEL_NAME = r"^[a-zA-Z_][a-zA-Z0-9_]*$"
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}


def _obj(properties: dict, required: tuple = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


_METADATA = _obj({
    "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
             "maxLength": 253},
    "namespace": {"type": "string"},
    "labels": _STRING_MAP,
    "annotations": _STRING_MAP,
}, ("name",))
_RELABEL = _obj({
    "action": {"type": "string", "enum": [
        "replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod", "labelmap", "LabelMap",
        "labeldrop", "LabelDrop", "labelkeep", "LabelKeep", "lowercase", "Lowercase", "uppercase", "Uppercase",
        "keepequal", "KeepEqual", "dropequal", "DropEqual"]},
    "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": _LABEL_NAME}},
    "separator": {"type": "string"},
    "targetLabel": {"type": "string"},
    "regex": {"type": "string"},
    "modulus": {"type": "integer"},
    "replacement": {"type": "string"},
})
_LABEL_SELECTOR = _obj({
    "matchLabels": _STRING_MAP,
    "matchExpressions": {"type": "array", "items": _obj({
        "key": {"type": "string"}, "operator": {"type": "string"},
        "values": {"type": "array", "items": {"type": "string"}}}, ("key", "operator"))},
})
_ENDPOINT = _obj({
    "port": {"type": "string"},
    "targetPort": {"type": ["integer", "string"]},
    "path": {"type": "string"},
    "scheme": {"type": "string", "enum": ["http", "https"]},
    "interval": {"type": "string", "pattern": _DURATION},
    "scrapeTimeout": {"type": "string", "pattern": _DURATION},
    "honorLabels": {"type": "boolean"},
    "honorTimestamps": {"type": "boolean"},
    "relabelings": {"type": "array", "items": _RELABEL},
    "metricRelabelings": {"type": "array", "items": _RELABEL},
})
_RULE = _obj({
    "record": {"type": "string"},
    "alert": {"type": "string"},
    "expr": {"type": ["integer", "string"]},
    "for": {"type": "string", "pattern": _DURATION},
    "keep_firing_for": {"type": "string", "pattern": _DURATION, "minLength": 1},
    "labels": _STRING_MAP,
    "annotations": _STRING_MAP,
}, ("expr",))
CRD_SCHEMAS = {
    "ServiceMonitor": _obj({
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": _METADATA,
        "spec": _obj({
            "jobLabel": {"type": "string"},
            "targetLabels": {"type": "array", "items": {"type": "string"}},
            "podTargetLabels": {"type": "array", "items": {"type": "string"}},
            "sampleLimit": {"type": "integer"},
            "namespaceSelector": _obj({"any": {"type": "boolean"},
                                       "matchNames": {"type": "array", "items": {"type": "string"}}}),
            "selector": _LABEL_SELECTOR,
            "endpoints": {"type": "array", "items": _ENDPOINT},
        }, ("endpoints", "selector")),
    }, ("apiVersion", "kind", "metadata", "spec")),
    "PrometheusRule": _obj({
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": _METADATA,
        "spec": _obj({
            "groups": {"type": "array", "items": _obj({
                "name": {"type": "string", "minLength": 1},
                "interval": {"type": "string", "pattern": _DURATION},
                "query_offset": {"type": "string", "pattern": _DURATION},
                "limit": {"type": "integer"},
                "labels": _STRING_MAP,
                "rules": {"type": "array", "items": _RULE},
            }, ("name",))},
        }),
    }, ("apiVersion", "kind", "metadata", "spec")),
}
MONITORING_GROUP = "monitoring.coreos.com"


def is_monitoring_crd(obj: dict) -> bool:
    return str(obj.get("apiVersion", "")).split("/")[0] == MONITORING_GROUP


def crd_schema_checks(rep, where: str, obj: dict) -> None:
    kind = obj.get("kind")
    name = f"{where}: {kind}/{(obj.get('metadata') or {}).get('name')}: CRD schema (strict subset)"
    schema = CRD_SCHEMAS.get(kind)
    if schema is None:
        rep.check(name, False, f"no schema for {kind}: add the fields used to CRD_SCHEMAS in tests/deploy/monitoring.py")
        return
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(obj), key=lambda e: list(e.path))
    detail = "; ".join(f"{'.'.join(map(str, e.path)) or '/'}: {e.message}" for e in errors[:3])
    rep.check(name, not errors, detail)


# --------------------------------------------------------------------------
# PromQL


_OPS = {"MatchOp.Equal": "=", "MatchOp.NotEqual": "!=", "MatchOp.Re": "=~", "MatchOp.NotRe": "!~"}


class Query:
    """One parsed PromQL expression: its selectors and grouping labels."""

    def __init__(self, expr: str):
        self.expr = expr
        self.error = None
        self.selectors: list[tuple[str | None, list[tuple[str, str, str]]]] = []
        self.groupings: set[str] = set()
        try:
            tree = promql_parser.parse(expr)
        except (ValueError, TypeError) as e:
            self.error = str(e)
            return
        promql_parser.walk(tree, self._visit)

    def _visit(self, node):
        if isinstance(node, promql_parser.VectorSelector):
            matchers = [(m.name, _OPS.get(str(m.op), str(m.op)), m.value) for m in node.matchers.matchers]
            name = node.name or next((v for n, op, v in matchers if n == "__name__" and op == "="), None)
            self.selectors.append((name, [m for m in matchers if m[0] != "__name__"]))
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            self.groupings |= set(node.modifier.labels or [])
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            m = node.modifier
            if m.matching is not None:
                self.groupings |= set(m.matching.labels or [])
            self.groupings |= set(getattr(m, "group_labels", None) or [])
        return True

    def metrics(self) -> set[str]:
        return {n for n, _ in self.selectors if n}


def excludes_watch(matchers) -> bool:
    for label, op, value in matchers:
        if label != "grpc_type":
            continue
        if (op == "=" and value != "server_stream") or (op == "!=" and value == "server_stream"):
            return True
        if op in ("=~", "!~") and (re.fullmatch(value, "server_stream") is None) == (op == "=~"):
            return True
    return False


def label_problems(q: Query, records: set[str]) -> list[str]:
    out = []
    for name, matchers in q.selectors:
        known = EXPOSED.get(name, ALL_LABELS if name in records else set()) | TARGET_LABELS
        for label, op, value in matchers:
            if label not in known:
                out.append(f"{name} has no label {label!r}")
            elif label in LABEL_VALUES and "$" not in value:
                values = [value] if op in ("=", "!=") else (
                    value.split("|") if re.fullmatch(r"[A-Za-z_]+(\|[A-Za-z_]+)*", value) else [])
                out += [f"{label}={v!r} is not a value the sidecar uses" for v in values
                        if v not in LABEL_VALUES[label]]
    out += [f"grouping label {g!r} is on no series" for g in sorted(q.groupings - ALL_LABELS)]
    return out


def query_checks(rep, name: str, q: Query, records: set[str], all_unary: bool) -> None:
    """The metric, label and Watch rules for one expression."""
    if not rep.check(f"{name}: parses as PromQL", q.error is None, q.error or ""):
        return
    unknown = sorted(q.metrics() - set(EXPOSED) - records)
    rep.check(f"{name}: uses only metrics the sidecar exposes", not unknown and all(n for n, _ in q.selectors),
              f"unknown {unknown}" if unknown else "a selector without a metric name")
    problems = label_problems(q, records)
    rep.check(f"{name}: label names and values are the sidecar's", not problems, "; ".join(problems))
    grpc = [(n, m) for n, m in q.selectors if n and n.startswith("grpc_server_")]
    if grpc:
        rep.check(f"{name}: grpc_server_* selectors name grpc_service=\"{DOCUMENT_SERVICE}\"",
                  all(("grpc_service", "=", DOCUMENT_SERVICE) in m for _, m in grpc),
                  "grpc_server_* is a common metric name: other gRPC servers expose it too")
    latency = [m for n, m in grpc if n.startswith("grpc_server_handling_seconds")]
    if latency or (grpc and all_unary):
        rep.check(f"{name}: excludes Watch (grpc_type=\"server_stream\")",
                  all(excludes_watch(m) for _, m in (grpc if all_unary else [(None, m) for m in latency])),
                  "latency, error ratios and SLO figures exclude the long-lived Watch stream")


def promtool_binary() -> str | None:
    return os.environ.get("PROMTOOL") or shutil.which("promtool")


def promtool(rep, name: str, args: list[str], files: dict[str, str]) -> None:
    """Runs promtool on files written to a scratch directory."""
    binary = promtool_binary()
    if binary is None:
        rep.check(f"{name}: promtool {' '.join(args[:2])}", False,
                  "promtool not found: Debian's prometheus package ships it (.ci/run extracts it from the "
                  "package without installing the server), or set PROMTOOL")
        return
    with tempfile.TemporaryDirectory() as tmp:
        for fname, text in files.items():
            Path(tmp, fname).write_text(text, encoding="utf-8")
        try:
            out = subprocess.run([binary, *args], cwd=tmp, capture_output=True, text=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            rep.check(f"{name}: promtool {' '.join(args[:2])}", False, str(e))
            return
        text = " ".join((out.stdout + out.stderr).split())
        rep.check(f"{name}: promtool {' '.join(args[:2])}", out.returncode == 0, text[-1500:])


# --------------------------------------------------------------------------
# PrometheusRule


def rules_of(obj: dict) -> list[dict]:
    return [r for g in (obj.get("spec") or {}).get("groups") or [] for r in g.get("rules") or []]


def prometheusrule_checks(rep, where: str, obj: dict) -> None:
    owner = f"{where}: PrometheusRule/{obj['metadata'].get('name')}"
    groups = (obj.get("spec") or {}).get("groups") or []
    names = [g.get("name") for g in groups]
    rep.check(f"{owner}: group names unique", len(names) == len(set(names)), f"{names}")
    rules = rules_of(obj)
    records = {r["record"] for r in rules if "record" in r}
    parsed: dict[str, Query] = {}
    for i, r in enumerate(rules):
        ident = r.get("alert") or r.get("record") or f"rules[{i}]"
        rname = f"{owner}: {'alert' if 'alert' in r else 'record'} {ident}"
        rep.check(f"{rname}: exactly one of record and alert", ("record" in r) != ("alert" in r))
        if "record" in r:
            rep.check(f"{rname}: recorded name is level:metric:operations",
                      re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*:[a-zA-Z0-9_:]*[a-zA-Z0-9_]", r["record"]) is not None,
                      "a colon keeps it apart from the names the sidecar exposes")
            rep.check(f"{rname}: no for/annotations on a recording rule", not ({"for", "annotations"} & set(r)))
        else:
            sev = (r.get("labels") or {}).get("severity")
            rep.check(f"{rname}: severity label", sev in SEVERITIES, f"severity {sev!r}, want one of {SEVERITIES}")
            rep.check(f"{rname}: summary annotation", bool((r.get("annotations") or {}).get("summary")))
        q = parsed[f"{ident}#{i}"] = Query(str(r.get("expr", "")))
        query_checks(rep, rname, q, records, all_unary=True)

    # Which exposed metrics each alert depends on, through the recorded series.
    by_record = {r["record"]: Query(str(r["expr"])) for r in rules if "record" in r}

    def depends(q: Query, seen=()) -> set[str]:
        out = set()
        for m in q.metrics():
            if m in by_record and m not in seen:
                out |= depends(by_record[m], seen + (m,))
            else:
                out.add(m)
        return out

    alerts = [depends(Query(str(r["expr"]))) for r in rules if "alert" in r]
    for what, needs in REQUIRED_ALERTS.items():
        rep.check(f"{owner}: an alert covers {what}", any(needs <= a for a in alerts), f"none uses {sorted(needs)}")

    spec_yaml = yaml.safe_dump(obj.get("spec") or {}, sort_keys=False)
    promtool(rep, owner, ["check", "rules", "--lint=all", "--lint-fatal", "rules.yaml"], {"rules.yaml": spec_yaml})
    # Unit tests: descriptions (prose) dropped, summaries kept and compared.
    tested = json.loads(json.dumps(obj.get("spec") or {}))
    for r in rules_of({"spec": tested}):
        (r.get("annotations") or {}).pop("description", None)
    promtool(rep, owner, ["test", "rules", "rules.test.yaml"],
             {"rules.yaml": yaml.safe_dump(tested, sort_keys=False),
              "rules.test.yaml": RULE_TESTS.read_text(encoding="utf-8")})


def rule_test_file_checks(rep) -> None:
    """The series the unit tests feed are ones the sidecar exposes."""
    where = str(RULE_TESTS.relative_to(HERE.parents[1]))
    doc = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    series = [s["series"] for t in doc.get("tests") or [] for s in t.get("input_series") or []]
    problems = []
    for s in series:
        q = Query(s)
        if q.error:
            problems.append(f"{s!r}: {q.error}")
            continue
        problems += [f"unknown metric {m}" for m in q.metrics() - set(EXPOSED)]
        problems += label_problems(q, set())
    rep.check(f"{where}: {len(series)} test series use the sidecar's metric names and labels", not problems,
              "; ".join(sorted(set(problems))[:5]))


# --------------------------------------------------------------------------
# ServiceMonitor


def servicemonitor_checks(rep, where: str, obj: dict, targets: list[dict]) -> None:
    """targets: {"service": Service, "admin_port": int, "containers": [...]}, from the deployable renders."""
    owner = f"{where}: ServiceMonitor/{obj['metadata'].get('name')}"
    spec = obj.get("spec") or {}
    sel = (spec.get("selector") or {}).get("matchLabels") or {}
    hits = [t for t in targets
            if sel and all(((t["service"].get("metadata") or {}).get("labels") or {}).get(k) == v
                           for k, v in sel.items())]
    rep.check(f"{owner}: selects the sidecar's metrics Service", bool(hits) and not spec.get("namespaceSelector"),
              f"matchLabels {sel} select no Service of deploy/ (and no namespaceSelector: the app's namespace)")
    for i, ep in enumerate(spec.get("endpoints") or []):
        name = f"{owner}: endpoints[{i}]"
        for t in hits:
            port = next((p for p in t["service"]["spec"].get("ports") or [] if p.get("name") == ep.get("port")), None)
            rep.check(f"{name}: names a port of Service {t['service']['metadata']['name']}", port is not None,
                      f"port {ep.get('port')!r}")
            if port is not None:
                tp = port.get("targetPort", port.get("port"))
                number = tp if isinstance(tp, int) else next(
                    (p.get("containerPort") for c in t["containers"] for p in c.get("ports") or []
                     if p.get("name") == tp), None)
                rep.check(f"{name}: reaches the sidecar's admin port", number == t["admin_port"],
                          f"targetPort {tp!r} is {number}, the admin port {t['admin_port']}")
        rep.check(f"{name}: path /metrics over http", ep.get("path") == "/metrics" and ep.get("scheme", "http") == "http",
                  f"path {ep.get('path')!r}, scheme {ep.get('scheme')!r}")
        drops = any(r.get("action", "replace").lower() == "labeldrop" and re.fullmatch(r.get("regex", "(.*)"), "service")
                    for r in ep.get("relabelings") or [])
        rep.check(f"{name}: the sidecar's `service` label survives", drops or ep.get("honorLabels") is True,
                  "the operator's `service` target label would rename the sidecar's to exported_service: "
                  "drop the target label (relabelings labeldrop service) or set honorLabels")


# --------------------------------------------------------------------------
# Grafana dashboard


GRAFANA_INTERVALS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
_VAR = re.compile(r"\$(?:\{([A-Za-z0-9_]+)(?::[^}]*)?\}|([A-Za-z0-9_]+))")


def substitute(expr: str, variables: set[str]) -> tuple[str, list[str]]:
    """Grafana variables replaced so that PromQL parsers accept the query."""
    undefined = []

    def repl(m):
        var = m.group(1) or m.group(2)
        if var in GRAFANA_INTERVALS:
            return GRAFANA_INTERVALS[var]
        if var not in variables:
            undefined.append(var)
        return "x"

    return _VAR.sub(repl, expr), undefined


def dashboard_panels(dash: dict) -> list[tuple[dict, str]]:
    """(panel, title of its row) for every panel, rows included, collapsed rows' panels too."""
    out, row = [], ""
    for p in dash.get("panels") or []:
        if p.get("type") == "row":
            row = p.get("title", "")
            out.append((p, row))
            out += [(c, row) for c in p.get("panels") or []]
        else:
            out.append((p, row))
    return out


def dashboard_checks(rep, where: str, cm: dict) -> None:
    owner = f"{where}: ConfigMap/{cm['metadata'].get('name')}"
    labels = (cm.get("metadata") or {}).get("labels") or {}
    rep.check(f"{owner}: labelled grafana_dashboard: \"1\" (Grafana's dashboard sidecar)",
              labels.get("grafana_dashboard") == "1", f"labels {labels}")
    data = cm.get("data") or {}
    rep.check(f"{owner}: holds one dashboard (*.json)", len(data) == 1 and all(k.endswith(".json") for k in data),
              f"keys {sorted(data)}")
    for key, text in data.items():
        name = f"{owner} {key}"
        try:
            dash = json.loads(text)
        except json.JSONDecodeError as e:
            rep.check(f"{name}: parses as JSON", False, str(e))
            continue
        rep.check(f"{name}: uid, title and schemaVersion",
                  isinstance(dash.get("uid"), str) and bool(dash.get("title")) and isinstance(dash.get("schemaVersion"), int)
                  and dash.get("id") is None, "uid and title set, id null (Grafana assigns it)")
        tvars = (dash.get("templating") or {}).get("list") or []
        variables = {v.get("name") for v in tvars}
        ds_vars = [v["name"] for v in tvars if v.get("type") == "datasource" and v.get("query") == "prometheus"]
        rep.check(f"{name}: a Prometheus data source variable", bool(ds_vars), "the data source is chosen, not fixed")
        panels = dashboard_panels(dash)
        ids = [p.get("id") for p, _ in panels]
        rep.check(f"{name}: panel ids unique", len(ids) == len(set(ids)) and None not in ids, f"{ids}")
        queries: list[tuple[str, str, str]] = []  # (check name, expr, record name)
        for v in tvars:
            if v.get("type") != "query":
                continue
            text_q = (v.get("query") or {}).get("query") if isinstance(v.get("query"), dict) else v.get("query")
            m = re.fullmatch(r"label_values\((.+),\s*([a-zA-Z_][a-zA-Z0-9_]*)\)", str(text_q or ""))
            if rep.check(f"{name}: variable {v['name']} is label_values(selector, label)", m is not None, f"{text_q!r}"):
                queries.append((f"{name}: variable {v['name']}", m.group(1), f"dashboard_check:var_{v['name']}"))
                rep.check(f"{name}: variable {v['name']} label {m.group(2)} exists", m.group(2) in ALL_LABELS)
        grouped: set[str] = set()
        used: set[str] = set()
        for p, row in panels:
            if p.get("type") == "row":
                continue
            pname = f"{name}: panel {p.get('id')} {p.get('title')!r}"
            ds = p.get("datasource") or {}
            rep.check(f"{pname}: uses the data source variable",
                      ds.get("uid") in {f"${{{d}}}" for d in ds_vars} | {f"${d}" for d in ds_vars}, f"{ds}")
            gp = p.get("gridPos") or {}
            rep.check(f"{pname}: fits the 24-column grid",
                      all(isinstance(gp.get(k), int) for k in "hwxy") and gp["x"] + gp["w"] <= 24, f"{gp}")
            targets = p.get("targets") or []
            refs = [t.get("refId") for t in targets]
            rep.check(f"{pname}: has queries with distinct refIds", bool(targets) and len(refs) == len(set(refs)), f"{refs}")
            for t in targets:
                expr, undefined = substitute(str(t.get("expr", "")), variables)
                tname = f"{pname} {t.get('refId')}"
                rep.check(f"{tname}: variables defined", not undefined, f"undefined {undefined}")
                q = Query(expr)
                query_checks(rep, tname, q, set(), all_unary=not row.lower().startswith("watch"))
                used |= q.metrics()
                grouped |= q.groupings
                queries.append((tname, expr, f"dashboard_check:panel_{p.get('id')}_{t.get('refId')}"))
        missing = sorted(REQUIRED_DASHBOARD_METRICS - used)
        rep.check(f"{name}: shows requests, errors, latency, pool, database, Watch, memory and CPU", not missing,
                  f"no panel uses {missing}")
        rep.check(f"{name}: breaks calls down by method and collection", REQUIRED_DASHBOARD_GROUPINGS <= grouped,
                  f"grouped by {sorted(grouped)}")
        rules = {"groups": [{"name": "dashboard", "rules": [{"record": r, "expr": e} for _, e, r in queries]}]}
        promtool(rep, f"{name}: {len(queries)} queries", ["check", "rules", "queries.yaml"],
                 {"queries.yaml": yaml.safe_dump(rules, sort_keys=False)})


# --------------------------------------------------------------------------
# Everything on one render


def monitoring_checks(rep, where: str, objs: list[dict], targets: list[dict]) -> None:
    for obj in objs:
        kind = obj.get("kind")
        if kind == "PrometheusRule":
            prometheusrule_checks(rep, where, obj)
        elif kind == "ServiceMonitor":
            servicemonitor_checks(rep, where, obj, targets)
        elif kind == "ConfigMap" and ("grafana_dashboard" in ((obj.get("metadata") or {}).get("labels") or {})
                                      or any(k.endswith(".json") for k in obj.get("data") or {})):
            dashboard_checks(rep, where, obj)


def has_monitoring(objs: list[dict]) -> bool:
    return any(is_monitoring_crd(o) for o in objs)


# --------------------------------------------------------------------------
# Mutations: each must be caught


def _first(objs, kind):
    return next(o for o in objs if o.get("kind") == kind)


def _rule(objs, ident):
    return next(r for r in rules_of(_first(objs, "PrometheusRule")) if ident in (r.get("alert"), r.get("record")))


def _dashboard_edit(objs, old, new, count=1):
    cm = next(o for o in objs if o.get("kind") == "ConfigMap" and "grafana_dashboard" in o["metadata"].get("labels", {}))
    key = next(iter(cm["data"]))
    if old not in cm["data"][key]:
        raise ValueError(f"{old!r} not in the dashboard")
    cm["data"][key] = cm["data"][key].replace(old, new, count)


def _sub_expr(objs, ident, old, new):
    r = _rule(objs, ident)
    if old not in r["expr"]:
        raise ValueError(f"{old!r} not in {ident}")
    r["expr"] = r["expr"].replace(old, new)


MUTATIONS = {
    "misspelled ServiceMonitor field": ("CRD schema", lambda o: _first(o, "ServiceMonitor")["spec"]["endpoints"][0]
                                        .update(intervall="30s")),
    "ServiceMonitor on a port the Service lacks": (
        "names a port of", lambda o: _first(o, "ServiceMonitor")["spec"]["endpoints"][0].update(port="http")),
    "ServiceMonitor keeps the clashing service label": (
        "`service` label survives", lambda o: _first(o, "ServiceMonitor")["spec"]["endpoints"][0].pop("relabelings")),
    "PromQL syntax error in a rule": ("promtool check", lambda o: _sub_expr(
        o, "DocsidecarDatabaseDown", "docsidecar_database_up == 0", "docsidecar_database_up == 0)")),
    "rule on a metric the sidecar does not expose": ("only metrics the sidecar exposes", lambda o: _sub_expr(
        o, "DocsidecarDatabaseDown", "docsidecar_database_up", "docsidecar_db_up")),
    "misspelled gRPC code": ("label names and values", lambda o: _sub_expr(
        o, "namespace_job:docsidecar_unary_server_faults:rate5m", "DEADLINE_EXCEEDED", "DEADLINE_EXCEED")),
    "latency including Watch": ("excludes Watch", lambda o: _sub_expr(
        o, "namespace_job_le:docsidecar_unary_handling_seconds_bucket:rate5m", ', grpc_type="unary"', "")),
    "certificate critical at 30 days": ("promtool test", lambda o: next(
        r for r in rules_of(_first(o, "PrometheusRule")) if r.get("alert") == "DocsidecarCertificateExpiry"
        and r["labels"]["severity"] == "critical").update(expr="docsidecar_tls_certificate_expiry_timestamp_seconds"
                                                                " - time() < 30 * 86400")),
    "alert without severity": ("severity label", lambda o: _rule(o, "DocsidecarPoolWaiting").pop("labels")),
    "no alert on the database": ("covers database unreachable", lambda o: [
        g.update(rules=[r for r in g["rules"] if r.get("alert") != "DocsidecarDatabaseDown"])
        for g in _first(o, "PrometheusRule")["spec"]["groups"]]),
    "dashboard panel on an unknown metric": (
        "only metrics the sidecar exposes", lambda o: _dashboard_edit(o, "process_open_fds{", "process_open_files{")),
    "dashboard latency including Watch": (
        "excludes Watch", lambda o: _dashboard_edit(o, 'grpc_type=\\"unary\\"}[$__rate_interval])))', '}[$__rate_interval])))')),
    "dashboard on an undefined variable": (
        "variables defined", lambda o: _dashboard_edit(o, 'namespace=\\"$namespace\\"', 'namespace=\\"$ns\\"')),
    "dashboard without its label": ("grafana_dashboard", lambda o: next(
        x for x in o if x.get("kind") == "ConfigMap")["metadata"]["labels"].pop("grafana_dashboard")),
}
