#!/usr/bin/env python3
"""Validates the Kubernetes material in deploy/, offline.

    python tests/deploy/validate.py [-v]

1. Renders every kustomization under deploy/ (base and overlays) with a small
   built-in renderer (see RENDERER below) and, when `kustomize` or `kubectl` is
   on PATH, renders it again with that tool and requires identical objects.
2. Validates every rendered object, and every other manifest file under deploy/
   (example secrets, optional manifests), against the Kubernetes OpenAPI JSON
   schemas bundled in the pip package kubernetes-validate, in strict mode (an
   unknown or misspelled field fails), for Kubernetes 1.29 (the first release
   with native sidecars on by default) and 1.37.
3. Checks the invariants the schemas cannot: every container non-root, with a
   read-only root filesystem, no privilege escalation, all capabilities dropped,
   RuntimeDefault seccomp and resource requests and limits; the sidecar a native
   sidecar (init container, restartPolicy Always) with its three probes on the
   admin port; terminationGracePeriodSeconds above shutdown delay + grace;
   secrets as files, never env; every referenced file, volume, port and role
   consistent across containers, the policy, the NetworkPolicy and the Service.
4. Monitoring (deploy/monitoring, see monitoring.py): ServiceMonitor and
   PrometheusRule against a strict subset of their CRD schemas, the rules with
   `promtool check rules` and the unit tests in rules.test.yaml (`promtool test
   rules`), the Grafana dashboard's queries with promtool, and every metric
   name and label in rules, tests and dashboard against the names the sidecar
   exposes; latency and SLO figures exclude the Watch stream.
5. Breaks a rendered overlay, the monitoring render and the migrate Job on
   purpose in several ways and requires each break to be caught, so a check
   that stops working cannot pass silently.

Prints one line per failure (and per check with -v), then
`deploy: N passed, M failed`; exits 1 if anything failed.

RENDERER: kustomize is a Go program that PyPI does not ship, so this script
carries a renderer for exactly the kustomization features deploy/ uses, and
refuses anything else:
  resources   files (multi-document YAML) and directories (other kustomizations)
  patches     `path:` files, either a strategic merge patch (maps merge, `null`
              deletes a key, lists of containers/initContainers/env/volumes/
              volumeMounts/imagePullSecrets/container ports merge by their key
              with kustomize's ordering, `$patch: delete` removes an element,
              other lists are replaced) or a JSON patch (RFC 6902: add, remove,
              replace, test) with a `target` (group, version, kind, name)
  images      name -> newName / newTag / digest, on every container and init
              container
  configMapGenerator  name, files (`key=path` or `path`), options (labels,
              annotations, disableNameSuffixHash: true; the name hash is not
              computed)
applied in kustomize's order: resources and generators, then patches, then
images.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

import kubernetes_validate
import yaml

import monitoring

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSIONS = ("1.29", "1.37")
KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SIDECAR_IMAGE = "docsidecar"
SIDECAR_UID = 65532
DEFAULT_SHUTDOWN_DELAY = 5.0  # seconds, the binary's defaults
DEFAULT_SHUTDOWN_GRACE = 25.0
PROBES = {"startupProbe": "/startupz", "livenessProbe": "/livez", "readinessProbe": "/readyz"}
COLLECTION_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
ROLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,62}$")
PLACEHOLDER = "CHANGE-ME"
# Database settings as the binary resolves them (a URL wins over DB_*).
DB_TYPES = {"sqlite": "sqlite", "memory": "memory", "postgres": "postgresql", "postgresql": "postgresql",
            "mysql": "mysql", "mariadb": "mariadb"}
DB_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}
DB_PART_VARS = ("DB_TYPE", "DB_HOST", "DB_PORT", "DB_NAME", "DB_USER")
VERIFIED_SSLMODES = ("verify-ca", "verify-full")
# Start-up wait for a networked database (src/store/postgres.rs): DB_MAX_RETRIES
# attempts (0: forever), DB_RETRY_DELAY before the second, doubling up to 30 s,
# each attempt bounded by the 5 s connect timeout.
DEFAULT_DB_MAX_RETRIES = 10
DEFAULT_DB_RETRY_DELAY = 1.0
MAX_RETRY_DELAY = 30.0
CONNECT_TIMEOUT = 5.0


# --------------------------------------------------------------------------
# Results


class Report:
    def __init__(self, verbose: bool = False, quiet: bool = False):
        self.passed = 0
        self.failures: list[str] = []
        self.verbose = verbose
        self.quiet = quiet

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            if self.verbose and not self.quiet:
                print(f"ok    {name}")
        else:
            self.failures.append(f"{name}: {detail}" if detail else name)
            if not self.quiet:
                print(f"FAIL  {name}" + (f": {detail}" if detail else ""))
        return ok


# --------------------------------------------------------------------------
# The renderer


class RenderError(Exception):
    pass


def load_yaml_docs(path: Path) -> list:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def kustomization_file(directory: Path) -> Path | None:
    for name in KUSTOMIZATION_NAMES:
        if (directory / name).is_file():
            return directory / name
    return None


def res_id(obj: dict) -> tuple:
    meta = obj.get("metadata") or {}
    return (obj.get("apiVersion"), obj.get("kind"), meta.get("namespace"), meta.get("name"))


def fmt_id(obj: dict) -> str:
    return f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"


def render(directory: Path, _stack: tuple = ()) -> list[dict]:
    """Builds one kustomization directory into a list of objects."""
    directory = directory.resolve()
    if directory in _stack:
        raise RenderError(f"{directory}: kustomization cycle")
    kfile = kustomization_file(directory)
    if kfile is None:
        raise RenderError(f"{directory}: no kustomization.yaml")
    docs = load_yaml_docs(kfile)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise RenderError(f"{kfile}: expected one mapping")
    k = docs[0]
    supported = {"apiVersion", "kind", "resources", "patches", "images", "configMapGenerator"}
    unsupported = set(k) - supported
    if unsupported:
        raise RenderError(
            f"{kfile}: field(s) {sorted(unsupported)} not supported by the built-in renderer "
            f"(supported: {sorted(supported)}); extend tests/deploy/validate.py first"
        )
    if k.get("kind", "Kustomization") != "Kustomization":
        raise RenderError(f"{kfile}: kind must be Kustomization")

    objs: list[dict] = []
    seen: set = set()
    for entry in k.get("resources") or []:
        if not isinstance(entry, str) or "://" in entry or entry.startswith("git@"):
            raise RenderError(f"{kfile}: resource {entry!r}: only local files and directories")
        path = (directory / entry).resolve()
        if path.is_dir():
            new = render(path, _stack + (directory,))
        elif path.is_file():
            new = load_yaml_docs(path)
        else:
            raise RenderError(f"{kfile}: resource {entry!r} does not exist")
        for obj in new:
            if not isinstance(obj, dict) or "kind" not in obj or "apiVersion" not in obj:
                raise RenderError(f"{path}: a document is not a Kubernetes object")
            if obj.get("kind") == "List":
                raise RenderError(f"{path}: kind List is not supported")
            rid = res_id(obj)
            if rid in seen:
                raise RenderError(f"{kfile}: {fmt_id(obj)} is defined twice")
            seen.add(rid)
            objs.append(obj)
    for obj in generate_configmaps(k, directory, kfile):
        if res_id(obj) in seen:
            raise RenderError(f"{kfile}: {fmt_id(obj)} is defined twice")
        seen.add(res_id(obj))
        objs.append(obj)

    for i, p in enumerate(k.get("patches") or []):
        apply_patch_entry(objs, p, directory, f"{kfile} patches[{i}]")

    for i, img in enumerate(k.get("images") or []):
        apply_image(objs, img, f"{kfile} images[{i}]")
    return objs


def generate_configmaps(k: dict, directory: Path, kfile: Path) -> list[dict]:
    """configMapGenerator entries: files only, with a fixed name."""
    out = []
    for i, g in enumerate(k.get("configMapGenerator") or []):
        where = f"{kfile} configMapGenerator[{i}]"
        if not isinstance(g, dict) or "name" not in g or set(g) - {"name", "files", "options"}:
            raise RenderError(f"{where}: only name, files and options are supported")
        opts = g.get("options") or {}
        if set(opts) - {"labels", "annotations", "disableNameSuffixHash"}:
            raise RenderError(f"{where}: options take labels, annotations, disableNameSuffixHash")
        if opts.get("disableNameSuffixHash") is not True:
            raise RenderError(f"{where}: set options.disableNameSuffixHash: true "
                              "(the built-in renderer does not compute kustomize's name hash)")
        data = {}
        for entry in g.get("files") or []:
            key, sep, rel = str(entry).partition("=")
            if not sep:
                key, rel = Path(entry).name, entry
            path = (directory / rel).resolve()
            if directory not in path.parents or not path.is_file():
                raise RenderError(f"{where}: {rel} is not a file inside {directory}")
            data[key] = path.read_text(encoding="utf-8")
        meta = {"name": g["name"]}
        for field in ("labels", "annotations"):
            if opts.get(field):
                meta[field] = dict(opts[field])
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    return out


def patch_files(directory: Path) -> set[Path]:
    """The files a kustomization (and the ones it includes) use as patches."""
    out: set[Path] = set()
    kfile = kustomization_file(directory)
    if kfile is None:
        return out
    k = load_yaml_docs(kfile)[0]
    for p in k.get("patches") or []:
        if isinstance(p, dict) and "path" in p:
            out.add((directory / p["path"]).resolve())
    return out


def group_version(api_version: str) -> tuple[str, str]:
    if "/" in api_version:
        g, v = api_version.split("/", 1)
        return g, v
    return "", api_version


def matches_target(obj: dict, target: dict, where: str) -> bool:
    allowed = {"group", "version", "kind", "name", "namespace"}
    if set(target) - allowed:
        raise RenderError(f"{where}: target field(s) {sorted(set(target) - allowed)} not supported")
    g, v = group_version(obj.get("apiVersion", ""))
    meta = obj.get("metadata") or {}
    if "group" in target and target["group"] != g:
        return False
    if "version" in target and target["version"] != v:
        return False
    if "kind" in target and target["kind"] != obj.get("kind"):
        return False
    # kustomize treats name and namespace as anchored regular expressions.
    if "name" in target and not re.fullmatch(target["name"], meta.get("name", "")):
        return False
    if "namespace" in target and not re.fullmatch(target["namespace"], meta.get("namespace") or ""):
        return False
    return True


def apply_patch_entry(objs: list[dict], entry: dict, directory: Path, where: str) -> None:
    if not isinstance(entry, dict) or set(entry) - {"path", "target"} or "path" not in entry:
        raise RenderError(f"{where}: only `path:` patches (with an optional `target:`) are supported")
    path = (directory / entry["path"]).resolve()
    if not path.is_file():
        raise RenderError(f"{where}: {entry['path']} does not exist")
    docs = load_yaml_docs(path)
    if len(docs) != 1:
        raise RenderError(f"{path}: a patch file holds exactly one patch")
    patch = docs[0]
    target = entry.get("target")
    if isinstance(patch, list):
        if not target:
            raise RenderError(f"{where}: a JSON patch needs a target")
        hits = [o for o in objs if matches_target(o, target, where)]
        if not hits:
            raise RenderError(f"{where}: target {target} matches no resource")
        for o in hits:
            json6902(o, patch, f"{path.name} on {fmt_id(o)}")
        return
    if not isinstance(patch, dict):
        raise RenderError(f"{path}: neither a strategic merge patch nor a JSON patch")
    if target:
        hits = [o for o in objs if matches_target(o, target, where)]
    else:
        pg, _ = group_version(patch.get("apiVersion", ""))
        pname = (patch.get("metadata") or {}).get("name")
        hits = [
            o for o in objs
            if o.get("kind") == patch.get("kind")
            and group_version(o.get("apiVersion", ""))[0] == pg
            and (o.get("metadata") or {}).get("name") == pname
        ]
    if not hits:
        raise RenderError(f"{where}: {path.name} matches no resource")
    for o in hits:
        merged = smp_merge(o, patch, ())
        o.clear()
        o.update(merged)


# Lists merged element by element (the patchMergeKey of the Kubernetes API).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}
# Lists the Kubernetes API merges by key that this renderer does not: refuse.
UNSUPPORTED_LISTS = {"hostAliases", "topologySpreadConstraints", "resourceClaims", "finalizers",
                     "volumeDevices", "schedulingGates", "envFrom"}


def smp_merge(dst, patch, path: tuple):
    if isinstance(patch, dict):
        directive = patch.get("$patch")
        if directive is not None and directive != "merge":
            raise RenderError(f"$patch: {directive} at {'.'.join(path)} is not supported")
        if not isinstance(dst, dict):
            return strip_directives(patch)
        out = dict(dst)
        for key, value in patch.items():
            if key.startswith("$"):
                if key != "$patch":
                    raise RenderError(f"directive {key} at {'.'.join(path)} is not supported")
                continue
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = smp_merge(out[key], value, path + (key,))
            else:
                out[key] = strip_directives(value)
        return out
    if isinstance(patch, list):
        field = path[-1] if path else ""
        if field in UNSUPPORTED_LISTS:
            raise RenderError(f"patching the list {'.'.join(path)} is not supported")
        merge_key = MERGE_KEYS.get(field)
        if field == "ports" and all(isinstance(e, dict) and "containerPort" in e for e in patch):
            merge_key = "containerPort"
        elif field == "ports":
            raise RenderError(f"patching the list {'.'.join(path)} is not supported")
        if merge_key is None or not isinstance(dst, list):
            return strip_directives(patch)
        # kustomize (kyaml merge2): the patch's elements first, in the patch's
        # order (merged into the existing element of the same key), then the
        # existing elements the patch does not name.
        by_key = {e.get(merge_key): e for e in dst if isinstance(e, dict)}
        named = set()
        out = []
        for e in patch:
            if not isinstance(e, dict) or merge_key not in e:
                raise RenderError(f"{'.'.join(path)}: element without its key {merge_key}")
            key = e[merge_key]
            named.add(key)
            if e.get("$patch") == "delete":
                continue
            if key in by_key:
                out.append(smp_merge(by_key[key], e, path + (str(key),)))
            else:
                out.append(strip_directives(e))
        out.extend(e for e in dst if not (isinstance(e, dict) and e.get(merge_key) in named))
        return out
    return patch


def strip_directives(value):
    if isinstance(value, dict):
        if any(k.startswith("$") for k in value):
            raise RenderError(f"directive in a new element {value}: not supported")
        return {k: strip_directives(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [strip_directives(v) for v in value]
    return value


def pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise RenderError(f"JSON pointer {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json6902(obj: dict, ops: list, where: str) -> None:
    for op in ops:
        kind = op.get("op")
        if kind not in ("add", "remove", "replace", "test"):
            raise RenderError(f"{where}: op {kind!r} not supported")
        parts = pointer(op["path"])
        parent = obj
        for p in parts[:-1]:
            try:
                parent = parent[int(p)] if isinstance(parent, list) else parent[p]
            except (KeyError, IndexError, ValueError) as e:
                raise RenderError(f"{where}: path {op['path']} does not exist") from e
        last = parts[-1]
        if isinstance(parent, list):
            if kind == "add" and last == "-":
                parent.append(copy.deepcopy(op["value"]))
                continue
            try:
                idx = int(last)
            except ValueError as e:
                raise RenderError(f"{where}: {op['path']}: not a list index") from e
            if not 0 <= idx <= len(parent) - (0 if kind == "add" else 1):
                raise RenderError(f"{where}: {op['path']}: index out of range")
            if kind == "add":
                parent.insert(idx, copy.deepcopy(op["value"]))
            elif kind == "remove":
                del parent[idx]
            elif kind == "replace":
                parent[idx] = copy.deepcopy(op["value"])
            elif parent[idx] != op["value"]:
                raise RenderError(f"{where}: test {op['path']} failed")
        elif isinstance(parent, dict):
            if kind in ("remove", "replace", "test") and last not in parent:
                raise RenderError(f"{where}: path {op['path']} does not exist")
            if kind in ("add", "replace"):
                parent[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[last]
            elif parent[last] != op["value"]:
                raise RenderError(f"{where}: test {op['path']} failed")
        else:
            raise RenderError(f"{where}: path {op['path']} does not exist")


def split_image(image: str) -> tuple[str, str | None, str | None]:
    name, digest = (image.split("@", 1) + [None])[:2] if "@" in image else (image, None)
    tag = None
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    return name, tag, digest


def apply_image(objs: list[dict], entry: dict, where: str) -> None:
    if not isinstance(entry, dict) or "name" not in entry or set(entry) - {"name", "newName", "newTag", "digest"}:
        raise RenderError(f"{where}: images entries take name, newName, newTag, digest")
    for c in all_containers_anywhere(objs):
        name, tag, digest = split_image(c.get("image", ""))
        if name != entry["name"]:
            continue
        name = entry.get("newName", name)
        if "digest" in entry:
            c["image"] = f"{name}@{entry['digest']}"
        elif "newTag" in entry:
            c["image"] = f"{name}:{entry['newTag']}"
        else:
            c["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def all_containers_anywhere(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers", "ephemeralContainers") and isinstance(value, list):
                for c in value:
                    if isinstance(c, dict):
                        yield c
            else:
                yield from all_containers_anywhere(value)
    elif isinstance(node, list):
        for v in node:
            yield from all_containers_anywhere(v)


def reference_render(directory: Path) -> tuple[str, list[dict]] | None:
    """Renders with the real kustomize (or kubectl's), when one is installed."""
    if shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(directory)]
    elif shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(directory)]
    else:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return (" ".join(cmd[:2]), [{"__error__": str(e)}])
    if out.returncode != 0:
        return (" ".join(cmd[:2]), [{"__error__": out.stderr.strip()[-2000:]}])
    return (" ".join(cmd[:2]), [d for d in yaml.safe_load_all(out.stdout) if d is not None])


def first_difference(a, b, path="") -> str:
    if type(a) is not type(b):
        return f"{path or '/'}: {a!r} != {b!r}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return f"{path}/{k}: only in {'built-in' if k in a else 'reference'} render"
            d = first_difference(a[k], b[k], f"{path}/{k}")
            if d:
                return d
        return ""
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} elements != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = first_difference(x, y, f"{path}/{i}")
            if d:
                return d
        return ""
    return "" if a == b else f"{path}: {a!r} != {b!r}"


# --------------------------------------------------------------------------
# Schemas


def schema_checks(rep: Report, where: str, objs: list[dict]) -> None:
    for obj in objs:
        if monitoring.is_monitoring_crd(obj):
            monitoring.crd_schema_checks(rep, where, obj)
            continue
        for version in K8S_VERSIONS:
            name = f"{where}: {fmt_id(obj)}: schema {version} strict"
            try:
                kubernetes_validate.validate(obj, version, strict=True)
                rep.check(name, True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                rep.check(name, False, f"{path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                rep.check(name, False, e.message)
            except Exception as e:  # noqa: BLE001 - any other problem is a failure too
                rep.check(name, False, f"{type(e).__name__}: {getattr(e, 'message', e)}")


# --------------------------------------------------------------------------
# Invariants


def pod_specs(obj: dict):
    """(pod spec, pod labels, pod annotations) of a workload, or None."""
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    if kind == "Pod":
        meta = obj.get("metadata") or {}
        return spec, meta.get("labels") or {}, meta.get("annotations") or {}
    if kind == "CronJob":
        spec = ((spec.get("jobTemplate") or {}).get("spec")) or {}
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"):
        tmpl = spec.get("template") or {}
        meta = tmpl.get("metadata") or {}
        return tmpl.get("spec") or {}, meta.get("labels") or {}, meta.get("annotations") or {}
    return None


def is_docsidecar(c: dict) -> bool:
    return split_image(c.get("image", ""))[0].rsplit("/", 1)[-1] == SIDECAR_IMAGE


def command_of(c: dict) -> str:
    args = list(c.get("command") or [])[1:] + list(c.get("args") or [])
    return args[0] if args and not str(args[0]).startswith("-") else "serve"


def env_map(c: dict) -> dict[str, str]:
    """Plain env values, with $(VAR) references to earlier entries expanded."""
    out: dict[str, str] = {}
    for e in c.get("env") or []:
        if "value" in e:
            out[e["name"]] = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                lambda m: out.get(m.group(1), m.group(0)),
                str(e["value"]),
            )
    return out


def unresolved_refs(c: dict) -> list[str]:
    defined: set[str] = set()
    bad = []
    for e in c.get("env") or []:
        for ref in re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(e.get("value", ""))):
            if ref not in defined:
                bad.append(f"{e['name']} uses $({ref}) before it is defined")
        defined.add(e["name"])
    return bad


def resolve_file(pod: dict, c: dict, path: str):
    """(volume, key) that a file path inside container c comes from, or None."""
    best = None
    for m in c.get("volumeMounts") or []:
        mp = m["mountPath"].rstrip("/")
        if path.startswith(mp + "/") and (best is None or len(mp) > len(best["mountPath"].rstrip("/"))):
            best = m
    if best is None:
        return None
    rel = path[len(best["mountPath"].rstrip("/")) + 1:]
    if best.get("subPath"):
        rel = f"{best['subPath']}/{rel}"
    vol = next((v for v in pod.get("volumes") or [] if v.get("name") == best["name"]), None)
    if vol is None:
        return None
    src = vol.get("secret") or vol.get("configMap")
    if src is not None and src.get("items"):
        item = next((i for i in src["items"] if i.get("path") == rel), None)
        return (vol, item["key"] if item else None)
    return (vol, rel.split("/", 1)[0])


def port_number(containers: list[dict], port) -> int | None:
    if isinstance(port, int):
        return port
    for c in containers:
        for p in c.get("ports") or []:
            if p.get("name") == port:
                return p.get("containerPort")
    return None


def listen_port(addr: str) -> int | None:
    try:
        return int(addr.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None


def is_pod_local(addr: str) -> bool:
    if addr.startswith("unix:"):
        return True
    host = addr.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def seconds(value, default: float) -> float:
    try:
        return float(value) if value is not None else default
    except ValueError:
        return float("nan")


def labels_match(selector: dict, labels: dict) -> bool:
    if set(selector) - {"matchLabels"}:
        return False  # matchExpressions: not used here, treated as no match
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def container_checks(rep: Report, where: str, pod: dict, c: dict) -> None:
    name = f"{where}: container {c.get('name')}"
    sc = c.get("securityContext") or {}
    psc = pod.get("securityContext") or {}

    def eff(key):
        return sc.get(key, psc.get(key))

    rep.check(f"{name}: runAsNonRoot", eff("runAsNonRoot") is True, "must be true")
    uid = eff("runAsUser")
    rep.check(f"{name}: runAsUser non-root", isinstance(uid, int) and uid != 0, f"runAsUser is {uid!r}")
    if is_docsidecar(c):
        rep.check(f"{name}: runs as the image's user {SIDECAR_UID}", uid == SIDECAR_UID, f"runAsUser is {uid!r}")
    rep.check(f"{name}: readOnlyRootFilesystem", sc.get("readOnlyRootFilesystem") is True, "must be true")
    rep.check(f"{name}: allowPrivilegeEscalation false", sc.get("allowPrivilegeEscalation") is False,
              "must be false")
    rep.check(f"{name}: not privileged", sc.get("privileged") is not True)
    caps = sc.get("capabilities") or {}
    rep.check(f"{name}: capabilities drop ALL", "ALL" in (caps.get("drop") or []), f"drop is {caps.get('drop')}")
    rep.check(f"{name}: no capabilities added", not caps.get("add"), f"add is {caps.get('add')}")
    seccomp = (eff("seccompProfile") or {}).get("type")
    rep.check(f"{name}: seccompProfile RuntimeDefault", seccomp in ("RuntimeDefault", "Localhost"),
              f"seccompProfile is {seccomp!r}")
    res = c.get("resources") or {}
    missing = [f"{kind}.{r}" for kind in ("requests", "limits") for r in ("cpu", "memory")
               if r not in (res.get(kind) or {})]
    rep.check(f"{name}: resource requests and limits", not missing, f"missing {missing}")

    secret_env = [e["name"] for e in c.get("env") or [] if "secretKeyRef" in (e.get("valueFrom") or {})]
    secret_env += [f"envFrom {e['secretRef'].get('name')}" for e in c.get("envFrom") or [] if "secretRef" in e]
    rep.check(f"{name}: no secret in env (secrets are mounted files)", not secret_env, f"{secret_env}")
    env = env_map(c)
    pw_env = [k for k in env if re.fullmatch(r"(MIGRATE_)?DB_PASS", k)]
    rep.check(f"{name}: no password in env", not pw_env, f"{pw_env} set: use *_FILE")
    url_pw = [k for k, v in env.items() if re.search(r"://[^/@:]+:[^/@]*@", v)]
    rep.check(f"{name}: no password in a URL", not url_pw, f"{url_pw}")
    rep.check(f"{name}: env references defined earlier", not unresolved_refs(c), "; ".join(unresolved_refs(c)))

    vols = {v.get("name"): v for v in pod.get("volumes") or []}
    for m in c.get("volumeMounts") or []:
        vol = vols.get(m.get("name"))
        rep.check(f"{name}: mount {m.get('mountPath')} has a volume", vol is not None,
                  f"no volume named {m.get('name')!r}")
        if vol is not None and ("secret" in vol or "configMap" in vol):
            rep.check(f"{name}: mount {m.get('mountPath')} without subPath (rotation reaches it)",
                      not m.get("subPath") and not m.get("subPathExpr"))


def pod_checks(rep: Report, where: str, pod: dict) -> None:
    rep.check(f"{where}: automountServiceAccountToken false", pod.get("automountServiceAccountToken") is False,
              "the pod needs no Kubernetes API token")
    host = [k for k in ("hostNetwork", "hostPID", "hostIPC") if pod.get(k)]
    rep.check(f"{where}: no host namespaces", not host, f"{host}")
    used = {m.get("name") for c in pod.get("containers", []) + pod.get("initContainers", [])
            for m in c.get("volumeMounts") or []}
    unused = [v.get("name") for v in pod.get("volumes") or [] if v.get("name") not in used]
    rep.check(f"{where}: every volume is mounted", not unused, f"unused {unused}")
    for c in pod.get("initContainers") or []:
        container_checks(rep, where, pod, c)
    for c in pod.get("containers") or []:
        container_checks(rep, where, pod, c)


def policy_checks(rep: Report, name: str, text: str) -> dict | None:
    """Parses a policy the way the sidecar does (unknown keys refused)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        rep.check(f"{name}: parses", False, str(e))
        return None
    problems = []
    problems += [f"unknown key {k!r}" for k in set(doc) - {"service", "auto_create", "collections", "clients"}]
    if not isinstance(doc.get("service"), str) or not doc["service"].strip():
        problems.append("`service` must name the service")
    if "auto_create" in doc and not isinstance(doc["auto_create"], bool):
        problems.append("auto_create must be a boolean")
    cols = doc.get("collections") or {}
    for cname, entry in cols.items():
        if not COLLECTION_RE.match(cname):
            problems.append(f"collection {cname!r} is not a valid name")
        if not isinstance(entry, dict) or set(entry) != {"access"} \
                or entry["access"] not in ("read-only", "read-write"):
            problems.append(f"collections.{cname} must be exactly access = read-only|read-write")
    for i, cl in enumerate(doc.get("clients") or []):
        if set(cl) - {"token_file", "collections", "access"} or not isinstance(cl.get("token_file"), str):
            problems.append(f"clients[{i}] takes token_file (required), collections, access")
        for cn in cl.get("collections") or []:
            if cn not in cols:
                problems.append(f"clients[{i}] names undeclared collection {cn!r}")
        if cl.get("access", "read-only") not in ("read-only", "read-write"):
            problems.append(f"clients[{i}].access is invalid")
    rep.check(f"{name}: valid policy", not problems, "; ".join(problems))
    return doc


def configmaps(objs: list[dict]) -> dict[str, dict]:
    return {(o.get("metadata") or {}).get("name"): o for o in objs if o.get("kind") == "ConfigMap"}


def file_from(rep: Report, name: str, pod: dict, c: dict, path: str, kind: str):
    """Checks that `path` in container c comes from a volume of `kind`."""
    hit = resolve_file(pod, c, path)
    ok = hit is not None and kind in hit[0] and hit[1] is not None
    rep.check(f"{name}: {path} comes from a mounted {kind}", ok,
              "no matching volume mount (or the item is not projected)")
    return hit if ok else None


def sidecar_checks(rep: Report, where: str, obj: dict, pod: dict, labels: dict, annotations: dict,
                   objs: list[dict], deployable: bool, ctx: dict) -> None:
    inits = pod.get("initContainers") or []
    mains = pod.get("containers") or []
    sidecars = [c for c in inits + mains if is_docsidecar(c) and command_of(c) == "serve"]
    migrates = [c for c in inits + mains if is_docsidecar(c) and command_of(c) == "migrate"]
    if not sidecars:
        for c in migrates:
            migrate_checks(rep, f"{where}: {c.get('name')}", pod, c, None, objs)
        return
    rep.check(f"{where}: one docsidecar", len(sidecars) == 1, f"{len(sidecars)} found")
    s = sidecars[0]
    name = f"{where}: sidecar {s.get('name')}"
    rep.check(f"{name}: is a native sidecar (initContainers, restartPolicy Always)",
              s in inits and s.get("restartPolicy") == "Always",
              "docsidecar must be an init container with restartPolicy: Always")
    env = env_map(s)

    admin = env.get("DOCSIDECAR_ADMIN_LISTEN")
    admin_port = listen_port(admin) if admin else None
    rep.check(f"{name}: DOCSIDECAR_ADMIN_LISTEN set", admin_port is not None, f"is {admin!r}")
    declared = [p.get("containerPort") for p in s.get("ports") or []]
    rep.check(f"{name}: admin port declared", admin_port in declared, f"{admin_port} not in ports {declared}")
    for probe, path in PROBES.items():
        hg = (s.get(probe) or {}).get("httpGet") or {}
        port = port_number([s], hg.get("port"))
        rep.check(f"{name}: {probe} httpGet {path} on the admin port",
                  hg.get("path") == path and port == admin_port and admin_port is not None,
                  f"is {hg.get('path')!r} on {hg.get('port')!r} (admin port {admin_port})")

    listen = env.get("DOCSIDECAR_LISTEN")
    rep.check(f"{name}: gRPC listens pod-locally (loopback or unix:)", listen is not None and is_pod_local(listen),
              f"DOCSIDECAR_LISTEN is {listen!r} (the image's default is 0.0.0.0:50051)")
    grpc_port = listen_port(listen) if listen and not listen.startswith("unix:") else None
    rep.check(f"{name}: gRPC port not declared as a container port", grpc_port not in declared or grpc_port is None)

    delay = seconds(env.get("DOCSIDECAR_SHUTDOWN_DELAY"), DEFAULT_SHUTDOWN_DELAY)
    grace = seconds(env.get("DOCSIDECAR_SHUTDOWN_GRACE"), DEFAULT_SHUTDOWN_GRACE)
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    rep.check(f"{where}: terminationGracePeriodSeconds > shutdown delay + grace", tgps > delay + grace,
              f"{tgps} <= {delay} + {grace}")

    # The policy, from a ConfigMap, and the token files it names, from a Secret.
    policy_path = env.get("DOCSIDECAR_POLICY")
    rep.check(f"{name}: DOCSIDECAR_POLICY set", bool(policy_path))
    policy = None
    if policy_path:
        hit = file_from(rep, name, pod, s, policy_path, "configMap")
        if hit:
            cm_name = hit[0]["configMap"].get("name")
            cm = configmaps(objs).get(cm_name)
            text = ((cm or {}).get("data") or {}).get(hit[1])
            rep.check(f"{name}: policy ConfigMap {cm_name} has key {hit[1]}", text is not None)
            if text is not None:
                policy = policy_checks(rep, f"{where}: ConfigMap {cm_name} {hit[1]}", text)
    tokens = [cl.get("token_file") for cl in (policy or {}).get("clients") or []]
    if env.get("DOCSIDECAR_TOKEN_FILE"):
        tokens.append(env["DOCSIDECAR_TOKEN_FILE"])
    rep.check(f"{name}: clients authenticate with a token", not policy or bool(tokens),
              "the policy declares no [[clients]] token_file: calls would need no token")
    for t in tokens:
        hit = file_from(rep, name, pod, s, t, "secret")
        if hit:
            app_has_it = any(m.get("name") == hit[0]["name"] for c in mains for m in c.get("volumeMounts") or [])
            rep.check(f"{name}: the app container mounts the token {t}", app_has_it,
                      f"no container mounts volume {hit[0]['name']}")
            ctx.setdefault("secrets_used", set()).add((hit[0]["secret"].get("secretName"), hit[1]))
    for var in ("DB_PASS_FILE", "DATABASE_URL_FILE"):
        if env.get(var):
            hit = file_from(rep, name, pod, s, env[var], "secret")
            if hit:
                ctx.setdefault("secrets_used", set()).add((hit[0]["secret"].get("secretName"), hit[1]))

    # Start-up: the probe must outlast the sidecar's own connection retries.
    budget = startup_retry_budget(env)
    sp = s.get("startupProbe") or {}
    window = sp.get("initialDelaySeconds", 0) + sp.get("periodSeconds", 10) * sp.get("failureThreshold", 3)
    rep.check(f"{name}: startupProbe budget exceeds the start-up retry budget", window > budget,
              f"initialDelaySeconds + periodSeconds x failureThreshold = {window} s <= {budget:g} s of "
              f"DB_MAX_RETRIES/DB_RETRY_DELAY retries (+{CONNECT_TIMEOUT:g} s connect timeout each)")

    # The database.
    db = db_settings(env)
    if deployable:
        rep.check(f"{name}: database set explicitly (DATABASE_URL or DB_TYPE)", db["type"] is not None,
                  "neither is set: the binary would open docsidecar.db in its working directory")
    parts = [v for v in DB_PART_VARS if v in env]
    urls = [v for v in ("DATABASE_URL", "DATABASE_URL_FILE") if env.get(v) is not None]
    rep.check(f"{name}: DB_* settings take effect", not (urls and parts), f"{urls} set: a URL wins over {parts}")
    if db["type"] == "sqlite":
        file = db.get("file") or ""
        rep.check(f"{name}: SQLite file is an absolute path", file.startswith("/"), f"{file!r}")
        hit = resolve_file(pod, s, file)
        ok = hit is not None and ("persistentVolumeClaim" in hit[0] or "emptyDir" in hit[0])
        rep.check(f"{name}: SQLite file {file} is on a volume", ok, "the root filesystem is read-only")
        spec = obj.get("spec") or {}
        if obj.get("kind") == "Deployment":
            rep.check(f"{where}: SQLite: one replica", spec.get("replicas", 1) == 1, "one writer per file")
            if hit and "persistentVolumeClaim" in hit[0]:
                rep.check(f"{where}: SQLite on a PVC: strategy Recreate",
                          (spec.get("strategy") or {}).get("type") == "Recreate",
                          "a rolling update would run two pods on one file")
                claim = hit[0]["persistentVolumeClaim"].get("claimName")
                if deployable:
                    rep.check(f"{where}: PVC {claim} is part of the render",
                              any(o.get("kind") == "PersistentVolumeClaim"
                                  and o["metadata"].get("name") == claim for o in objs))
    elif db["type"] in DB_DEFAULT_PORTS:
        networked_db_checks(rep, name, pod, s, db, "", ctx)
        rep.check(f"{name}: runtime role is a plain identifier", bool(db["user"] and ROLE_RE.match(db["user"])),
                  f"{db['user']!r}")
        ctx["db"] = db

    # Prometheus: the annotation names the admin port.
    if "prometheus.io/port" in annotations:
        rep.check(f"{where}: prometheus.io/port is the admin port",
                  str(annotations["prometheus.io/port"]) == str(admin_port),
                  f"{annotations['prometheus.io/port']} != {admin_port}")

    for m in migrates:
        migrate_checks(rep, f"{where}: {m.get('name')}", pod, m, s, objs, ctx)


def migrate_checks(rep, name, pod, m, sidecar, objs, ctx=None):
    inits = pod.get("initContainers") or []
    env = env_map(m)
    mdb = db_settings(env, "MIGRATE_")
    args = list(m.get("args") or [])
    grant = env.get("DOCSIDECAR_GRANT_TO")
    if "--grant-to" in args and args.index("--grant-to") + 1 < len(args):
        grant = args[args.index("--grant-to") + 1]
    grantee = grant_user(grant or "", mdb["type"])
    rep.check(f"{name}: migrate grants a runtime role (--grant-to)", grantee is not None,
              f"{grant!r} (PostgreSQL: a role name; MySQL/MariaDB: 'user'@'host')")
    rep.check(f"{name}: migrate names its database (MIGRATE_DATABASE_URL or MIGRATE_DB_TYPE)",
              mdb["type"] in DB_DEFAULT_PORTS, f"type {mdb['type']!r}")
    if mdb["type"] in DB_DEFAULT_PORTS:
        networked_db_checks(rep, name, pod, m, mdb, "MIGRATE_", ctx)
    if sidecar is not None:
        rep.check(f"{name}: migrate runs before the sidecar",
                  m in inits and sidecar in inits and inits.index(m) < inits.index(sidecar)
                  and m.get("restartPolicy") is None,
                  "must be an ordinary init container ahead of the sidecar")
        s_policy = resolve_file(pod, sidecar, env_map(sidecar).get("DOCSIDECAR_POLICY", "")) or (None, None)
        m_policy = resolve_file(pod, m, env.get("DOCSIDECAR_POLICY", "")) or (None, None)
        rep.check(f"{name}: migrate reads the sidecar's policy", s_policy[0] is not None and s_policy == m_policy,
                  "DOCSIDECAR_POLICY must name the same ConfigMap key as the sidecar's")
        db = (ctx or {}).get("db")
        if db:
            rep.check(f"{name}: --grant-to is the sidecar's database user", grantee == db["user"],
                      f"{grant!r} grants {grantee!r}, the sidecar is {db['user']!r}")
            keys = ("type", "hosts", "port", "name")
            same, want = {k: mdb.get(k) for k in keys}, {k: db[k] for k in keys}
            rep.check(f"{name}: migrate and sidecar use the same database", same == want, f"{same} != {want}")
            rep.check(f"{name}: admin role differs from the runtime role",
                      bool(mdb.get("user")) and mdb.get("user") != db["user"], f"{mdb.get('user')!r}")
    else:
        rep.check(f"{name}: DOCSIDECAR_POLICY set (the collections to create)", bool(env.get("DOCSIDECAR_POLICY")))
        if env.get("DOCSIDECAR_POLICY"):
            file_from(rep, name, pod, m, env["DOCSIDECAR_POLICY"], "configMap")
    pw = env.get("MIGRATE_DB_PASS_FILE") or env.get("MIGRATE_DATABASE_URL_FILE")
    rep.check(f"{name}: admin password from a file", bool(pw), "set MIGRATE_DB_PASS_FILE")
    if pw:
        hit = file_from(rep, name, pod, m, pw, "secret")
        if hit:
            others = [c.get("name") for c in inits + (pod.get("containers") or []) if c is not m
                      and any(mm.get("name") == hit[0]["name"] for mm in c.get("volumeMounts") or [])]
            rep.check(f"{name}: only migrate mounts the admin secret", not others, f"also in {others}")
            if ctx is not None:
                ctx.setdefault("secrets_used", set()).add((hit[0]["secret"].get("secretName"), hit[1]))


def networked_db_checks(rep, name, pod, c, db: dict, prefix: str, ctx) -> None:
    """PostgreSQL or MySQL/MariaDB settings of one container (sidecar or migrate)."""
    rep.check(f"{name}: {db['type']} settings name host, user and database",
              bool(db["hosts"]) and all(db["hosts"]) and bool(db["user"]) and bool(db["name"]),
              f"hosts {db['hosts']}, user {db['user']!r}, database {db['name']!r}")
    rep.check(f"{name}: {db['type']} port is a number", db["port"] is not None, f"{db.get('port')!r}")
    env = env_map(c)
    if not prefix:  # the file itself is checked with the sidecar's other files
        rep.check(f"{name}: {db['type']} password from a file",
                  bool(env.get("DB_PASS_FILE") or env.get("DATABASE_URL_FILE")), "set DB_PASS_FILE")
    # Managed databases need TLS, and only a verified certificate stops a man in the middle.
    rep.check(f"{name}: TLS to the database verifies the server ({prefix}DB_SSLMODE)",
              db["sslmode"] in VERIFIED_SSLMODES, f"is {db['sslmode']!r}, want one of {VERIFIED_SSLMODES}")
    ca = db["sslrootcert"]
    rep.check(f"{name}: {prefix}DB_SSLROOTCERT names the database's CA file", bool(ca))
    if ca:
        hit = resolve_file(pod, c, ca)
        ok = hit is not None and ("secret" in hit[0] or "configMap" in hit[0]) and hit[1] is not None
        rep.check(f"{name}: {ca} comes from a mounted secret or configMap", ok,
                  "no matching volume mount (or the item is not projected)")
        if ok and "secret" in hit[0] and ctx is not None:
            ctx.setdefault("secrets_used", set()).add((hit[0]["secret"].get("secretName"), hit[1]))


def db_settings(env: dict[str, str], prefix: str = "") -> dict:
    """The database a container's env selects, resolved as the binary does: a
    URL wins over the discrete settings; neither means the default SQLite file."""
    url = env.get(prefix + "DATABASE_URL")
    if url is not None:
        return parse_db_url(url)
    if env.get(prefix + "DATABASE_URL_FILE"):
        return {"type": "url-file"}  # read at run time: nothing to check here
    raw = env.get(prefix + "DB_TYPE")
    if raw is None:
        return {"type": None}
    typ = DB_TYPES.get(raw.lower(), raw)
    if typ == "sqlite":
        return {"type": typ, "file": env.get(prefix + "DB_NAME", "")}
    if typ not in DB_DEFAULT_PORTS:
        return {"type": typ}
    port = env.get(prefix + "DB_PORT")
    return {
        "type": typ,
        "hosts": [h.strip() for h in env.get(prefix + "DB_HOST", "").split(",")],
        "port": int(port) if port and port.isdigit() else (None if port else DB_DEFAULT_PORTS[typ]),
        "name": env.get(prefix + "DB_NAME"),
        "user": env.get(prefix + "DB_USER"),
        "sslmode": env.get(prefix + "DB_SSLMODE"),
        "sslrootcert": env.get(prefix + "DB_SSLROOTCERT"),
    }


def parse_db_url(url: str) -> dict:
    """scheme://user@host[:port][,host[:port]...]/db?sslmode=...&sslrootcert=..."""
    scheme, sep, rest = url.partition("://")
    if url.startswith("sqlite:"):
        file = url[len("sqlite:"):]
        return {"type": "sqlite", "file": file[2:] if file.startswith("//") else file}
    typ = DB_TYPES.get(scheme.lower()) if sep else None
    if typ not in DB_DEFAULT_PORTS:
        return {"type": typ or url}
    netloc, _, tail = rest.partition("/")
    name, _, query = tail.partition("?")
    params = dict(urllib.parse.parse_qsl(query))
    user, _, hostlist = netloc.rpartition("@")
    hosts, port = [], DB_DEFAULT_PORTS[typ]
    for h in hostlist.split(","):
        host, _, p = h.partition(":")
        hosts.append(host)
        if p:
            port = int(p) if p.isdigit() else None
    return {"type": typ, "hosts": hosts, "port": port, "name": name, "user": user.partition(":")[0] or None,
            "sslmode": params.get("sslmode"), "sslrootcert": params.get("sslrootcert")}


def grant_user(grant: str, db_type) -> str | None:
    """The user a --grant-to value names: a role (PostgreSQL) or 'user'@'host' (MySQL/MariaDB)."""
    if ROLE_RE.fullmatch(grant):
        return grant
    m = re.fullmatch(r"'([^'@]+)'@'([^']+)'|([A-Za-z_][A-Za-z0-9_-]*)@([A-Za-z0-9_.%-]+)", grant)
    if m and db_type in ("mysql", "mariadb"):
        user = m.group(1) or m.group(3)
        return user if ROLE_RE.fullmatch(user) else None
    return None


def startup_retry_budget(env: dict[str, str]) -> float:
    """Seconds the sidecar may spend waiting for its database before it gives up."""
    raw = env.get("DB_MAX_RETRIES", str(DEFAULT_DB_MAX_RETRIES))
    if not raw.isdigit() or int(raw) == 0:
        return float("inf")  # 0 retries forever: no probe can outlast it
    attempts = int(raw)
    wait, total = seconds(env.get("DB_RETRY_DELAY"), DEFAULT_DB_RETRY_DELAY), 0.0
    for _ in range(attempts - 1):
        total += wait
        wait = min(wait * 2, MAX_RETRY_DELAY)
    return total + attempts * CONNECT_TIMEOUT


def network_checks(rep: Report, where: str, pod: dict, labels: dict, objs: list[dict], ctx: dict) -> None:
    containers = (pod.get("containers") or []) + (pod.get("initContainers") or [])
    pols = [o for o in objs if o.get("kind") == "NetworkPolicy"
            and labels_match((o.get("spec") or {}).get("podSelector") or {}, labels)]
    types = {t for p in pols for t in (p["spec"].get("policyTypes") or [])}
    rep.check(f"{where}: a NetworkPolicy restricts ingress and egress", {"Ingress", "Egress"} <= types,
              f"policyTypes {sorted(types)}")
    sidecar = next((c for c in containers if is_docsidecar(c) and command_of(c) == "serve"), None)
    admin = listen_port(env_map(sidecar).get("DOCSIDECAR_ADMIN_LISTEN", "")) if sidecar else None
    declared = {p.get("containerPort") for c in containers for p in c.get("ports") or []}
    for p in pols:
        pname = p["metadata"]["name"]
        for i, rule in enumerate(p["spec"].get("ingress") or []):
            ports = [port_number(containers, x.get("port")) for x in rule.get("ports") or []]
            rep.check(f"{where}: NetworkPolicy {pname} ingress[{i}] names ports", bool(ports) and None not in ports,
                      f"ports {rule.get('ports')} (every port must be named and declared)")
            rep.check(f"{where}: NetworkPolicy {pname} ingress[{i}] opens only declared ports",
                      set(ports) <= declared, f"{ports} vs declared {sorted(declared)}")
            if admin in ports:
                rep.check(f"{where}: NetworkPolicy {pname} admin port only from selected peers",
                          bool(rule.get("from")), "the admin port is open to every source")
        for i, rule in enumerate(p["spec"].get("egress") or []):
            rep.check(f"{where}: NetworkPolicy {pname} egress[{i}] names ports", bool(rule.get("ports")))
    if ctx.get("db"):
        port = ctx["db"]["port"]
        ok = any(x.get("port") == port for p in pols for rule in p["spec"].get("egress") or []
                 for x in rule.get("ports") or [])
        rep.check(f"{where}: NetworkPolicy allows egress to the database port {port}", ok)
    for svc in (o for o in objs if o.get("kind") == "Service"):
        sel = (svc.get("spec") or {}).get("selector") or {}
        if sel and all(labels.get(k) == v for k, v in sel.items()):
            for sp in svc["spec"].get("ports") or []:
                tp = sp.get("targetPort", sp.get("port"))
                rep.check(f"{where}: Service {svc['metadata']['name']} port {sp.get('name')} targets a declared port",
                          port_number(containers, tp) in declared, f"targetPort {tp!r}")


def disruption_checks(rep: Report, where: str, obj: dict, labels: dict, objs: list[dict]) -> None:
    """A replicated workload keeps serving through node drains; no budget blocks them."""
    replicas = (obj.get("spec") or {}).get("replicas", 1)
    pdbs = [o for o in objs if o.get("kind") == "PodDisruptionBudget"
            and labels_match((o.get("spec") or {}).get("selector") or {}, labels)]
    if replicas > 1:
        rep.check(f"{where}: a PodDisruptionBudget covers the {replicas} replicas", bool(pdbs),
                  "a node drain could evict every replica at once")
    for pdb in pdbs:
        spec = pdb.get("spec") or {}
        pname = f"{where}: PodDisruptionBudget {pdb['metadata']['name']}"
        rep.check(f"{pname} allows an eviction", disruptions_allowed(spec, replicas) >= 1,
                  f"{ {k: v for k, v in spec.items() if k != 'selector'} } with {replicas} replica(s) "
                  "blocks every node drain")
        rep.check(f"{pname} lets unready pods go (unhealthyPodEvictionPolicy AlwaysAllow)",
                  spec.get("unhealthyPodEvictionPolicy") == "AlwaysAllow",
                  "while the database is down every pod is unready, and IfHealthyBudget would block drains")


def disruptions_allowed(spec: dict, replicas: int) -> int:
    """How many of `replicas` healthy pods the budget lets go (Kubernetes rounds percentages up)."""
    def count(v):
        if isinstance(v, str) and v.endswith("%"):
            return -(-int(v[:-1]) * replicas // 100)
        return int(v)
    if "maxUnavailable" in spec:
        return count(spec["maxUnavailable"])
    if "minAvailable" in spec:
        return replicas - count(spec["minAvailable"])
    return replicas


def job_network_checks(rep: Report, where: str, pod: dict, labels: dict, objs: list[dict]) -> None:
    """A Job's pods (migrate) serve nothing: no ingress; egress to DNS and the database only."""
    pols = [o for o in objs if o.get("kind") == "NetworkPolicy"
            and labels_match((o.get("spec") or {}).get("podSelector") or {}, labels)]
    types = {t for p in pols for t in (p["spec"].get("policyTypes") or [])}
    rep.check(f"{where}: a NetworkPolicy in the same file restricts the Job's ingress and egress",
              {"Ingress", "Egress"} <= types, f"policyTypes {sorted(types)}")
    ingress = [r for p in pols for r in p["spec"].get("ingress") or []]
    rep.check(f"{where}: the Job's pods admit no ingress", not ingress, f"ingress rules {ingress}")
    db_ports = {db_settings(env_map(c), "MIGRATE_").get("port") for c in pod.get("containers") or []
                if is_docsidecar(c) and command_of(c) == "migrate"} - {None}
    allowed = {(53, "UDP"), (53, "TCP")} | {(p, "TCP") for p in db_ports}
    opened, unbounded = set(), False
    for p in pols:
        for rule in p["spec"].get("egress") or []:
            if not rule.get("ports") or not rule.get("to"):
                unbounded = True
            opened |= {(x.get("port"), x.get("protocol", "TCP")) for x in rule.get("ports") or []}
    rep.check(f"{where}: the Job's egress is DNS and the database only",
              not unbounded and opened <= allowed and (53, "UDP") in opened and bool(db_ports & {p for p, _ in opened}),
              f"opens {sorted(opened, key=str)}{' and a rule without ports or peers' if unbounded else ''}; "
              f"allowed {sorted(allowed, key=str)}")


def render_checks(rep: Report, where: str, objs: list[dict], deployable: bool, secret_examples: dict,
                  targets: list[dict] | None = None) -> None:
    """Every invariant on one set of objects (a render or a manifest file).
    targets: the metrics Services of the deployable renders (scrape_targets)."""
    ctx: dict = {}
    if monitoring.has_monitoring(objs):
        monitoring.monitoring_checks(rep, where, objs, targets or [])
    for obj in objs:
        got = pod_specs(obj)
        if got is None:
            continue
        pod, labels, annotations = got
        owner = f"{where}: {fmt_id(obj)}"
        if obj.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
            sel = ((obj.get("spec") or {}).get("selector") or {})
            rep.check(f"{owner}: selector matches the pod labels", labels_match(sel, labels))
        pod_checks(rep, owner, pod)
        sidecar_checks(rep, owner, obj, pod, labels, annotations, objs, deployable, ctx)
        if obj.get("kind") in ("Job", "CronJob"):
            job_network_checks(rep, owner, pod, labels, objs)
        if deployable and obj.get("kind") in ("Deployment", "StatefulSet"):
            disruption_checks(rep, owner, obj, labels, objs)
        if deployable:
            for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
                _, tag, digest = split_image(c.get("image", ""))
                rep.check(f"{owner}: container {c.get('name')} image pinned", bool(digest or (tag and tag != "latest")),
                          f"image {c.get('image')!r}")
            network_checks(rep, owner, pod, labels, objs, ctx)
            for v in pod.get("volumes") or []:
                if "secret" in v:
                    for item in v["secret"].get("items") or [{"key": None}]:
                        ctx.setdefault("secrets_used", set()).add((v["secret"].get("secretName"), item["key"]))
                if "configMap" in v:
                    rep.check(f"{owner}: ConfigMap {v['configMap'].get('name')} is part of the render",
                              v["configMap"].get("name") in configmaps(objs))
    if deployable:
        rep.check(f"{where}: no Secret objects in the render", not [o for o in objs if o.get("kind") == "Secret"],
                  "kubectl apply -k would overwrite the real secrets")
        for secret, key in sorted(ctx.get("secrets_used", set()), key=str):
            have = secret_examples.get(secret)
            ok = have is not None and (key is None or key in have)
            rep.check(f"{where}: Secret {secret} key {key} documented in a *.example.yaml beside the overlay", ok,
                      f"examples define {sorted(secret_examples)}")


def secret_example_checks(rep: Report, path: Path, objs: list[dict]) -> dict[str, set]:
    out: dict[str, set] = {}
    rel = path.relative_to(ROOT)
    for o in objs:
        if o.get("kind") != "Secret":
            continue
        data = dict(o.get("stringData") or {})
        rep.check(f"{rel}: {fmt_id(o)}: example values only (stringData, marked {PLACEHOLDER})",
                  not o.get("data") and bool(data) and all(PLACEHOLDER in str(v) for v in data.values()),
                  "every value must be a placeholder containing " + PLACEHOLDER)
        out[o["metadata"]["name"]] = set(data)
    return out


# --------------------------------------------------------------------------
# Mutations: each must be caught


def _pod(objs):
    dep = next(o for o in objs if o.get("kind") == "Deployment")
    return dep, dep["spec"]["template"]["spec"]


def _sidecar(objs):
    return next(c for c in _pod(objs)[1]["initContainers"] if c["name"] == "docsidecar")


def _set_env(c, name, value):
    for e in c["env"]:
        if e["name"] == name:
            e["value"] = value
            return
    c["env"].append({"name": name, "value": value})


def _policy_cm(objs):
    return next(x for x in objs if x.get("kind") == "ConfigMap" and "policy.toml" in x.get("data", {}))


def _move_sidecar_to_containers(objs):
    spec = _pod(objs)[1]
    spec["containers"].append(spec["initContainers"].pop(spec["initContainers"].index(_sidecar(objs))))


def _open_admin_port(objs):
    for pol in (x for x in objs if x.get("kind") == "NetworkPolicy"):
        for rule in pol["spec"].get("ingress") or []:
            rule.pop("from", None)


def _migrate(objs):
    return next(c for c in _pod(objs)[1]["initContainers"] if c["name"] == "docsidecar-migrate")


def _unmount(c, volume):
    c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != volume]


def _of_kind(objs, kind):
    return next(o for o in objs if o.get("kind") == kind)


def _drop_db_egress(objs):
    objs.remove(next(x for x in objs
                     if x.get("kind") == "NetworkPolicy" and x["metadata"]["name"].endswith("database")))


# label: (text of the failure that must appear, how to break the render)
MUTATIONS = {
    "readOnlyRootFilesystem removed": (
        "readOnlyRootFilesystem", lambda o: _sidecar(o)["securityContext"].pop("readOnlyRootFilesystem")),
    "misspelled field": (
        "strict", lambda o: _sidecar(o)["securityContext"].update(readOnlyRootFileSystem=True)),
    "app container runs as root": (
        "runAsUser", lambda o: _pod(o)[1]["containers"][0]["securityContext"].update(runAsUser=0)),
    "capability added": (
        "no capabilities added", lambda o: _sidecar(o)["securityContext"]["capabilities"].update(add=["NET_ADMIN"])),
    "privilege escalation allowed": (
        "allowPrivilegeEscalation", lambda o: _sidecar(o)["securityContext"].update(allowPrivilegeEscalation=True)),
    "memory limit missing": ("requests and limits", lambda o: _sidecar(o)["resources"]["limits"].pop("memory")),
    "sidecar without restartPolicy": ("native sidecar", lambda o: _sidecar(o).pop("restartPolicy")),
    "sidecar moved to containers": ("native sidecar", _move_sidecar_to_containers),
    "readiness probe missing": ("readinessProbe", lambda o: _sidecar(o).pop("readinessProbe")),
    "liveness probe on the wrong path": (
        "livenessProbe", lambda o: _sidecar(o)["livenessProbe"]["httpGet"].update(path="/healthz")),
    "grace period too short": (
        "terminationGracePeriodSeconds", lambda o: _pod(o)[1].update(terminationGracePeriodSeconds=30)),
    "gRPC on all interfaces": ("pod-locally", lambda o: _set_env(_sidecar(o), "DOCSIDECAR_LISTEN", "0.0.0.0:50051")),
    "password in env": ("no secret in env", lambda o: _sidecar(o)["env"].append(
        {"name": "DB_PASS", "valueFrom": {"secretKeyRef": {"name": "docsidecar-runtime", "key": "db-password"}}})),
    "token volume not mounted in the sidecar": ("app-token comes from a mounted secret", lambda o: _sidecar(o).update(
        volumeMounts=[m for m in _sidecar(o)["volumeMounts"] if m["name"] != "app-token"])),
    "policy with an unknown key": ("valid policy", lambda o: _policy_cm(o)["data"].update(
        {"policy.toml": "bogus = 1\n" + _policy_cm(o)["data"]["policy.toml"]})),
    "admin port open to everyone": ("admin port only from", _open_admin_port),
    "secret rendered into the overlay": ("no Secret objects", lambda o: o.append(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}, "stringData": {"a": "b"}})),
    "startup probe shorter than the retries": (
        "startupProbe budget", lambda o: _sidecar(o)["startupProbe"].update(failureThreshold=60)),
    "start-up retries forever": ("startupProbe budget", lambda o: _set_env(_sidecar(o), "DB_MAX_RETRIES", "0")),
}
# Replicated overlays on a networked database (PostgreSQL, MySQL/MariaDB).
NETWORKED_MUTATIONS = {
    "migrate after the sidecar": ("migrate runs before", lambda o: _pod(o)[1]["initContainers"].reverse()),
    "grant to another role": ("--grant-to is the sidecar", lambda o: _pod(o)[1]["initContainers"][0].update(
        args=["migrate", "--grant-to", "someone_else"])),
    "migrate on another database": (
        "same database", lambda o: _set_env(_pod(o)[1]["initContainers"][0], "MIGRATE_DB_HOST", "elsewhere")),
    "DATABASE_URL next to DB_*": (
        "DB_* settings take effect", lambda o: _set_env(_sidecar(o), "DATABASE_URL", "sqlite:///data/x.db")),
    "no database setting at all": ("database set explicitly", lambda o: _sidecar(o).update(
        env=[e for e in _sidecar(o)["env"] if not e["name"].startswith("DB_")])),
    "TLS without verification": ("verifies the server", lambda o: _set_env(_sidecar(o), "DB_SSLMODE", "require")),
    "migrate without TLS": ("verifies the server", lambda o: _set_env(_migrate(o), "MIGRATE_DB_SSLMODE", "disable")),
    "database CA not mounted": ("comes from a mounted secret", lambda o: _unmount(_sidecar(o), "db-ca")),
    "no PodDisruptionBudget": ("PodDisruptionBudget covers", lambda o: o.remove(_of_kind(o, "PodDisruptionBudget"))),
    "PodDisruptionBudget blocks drains": (
        "allows an eviction", lambda o: _of_kind(o, "PodDisruptionBudget")["spec"].update(maxUnavailable=0)),
    "admin secret mounted in the sidecar": ("only migrate mounts", lambda o: _sidecar(o)["volumeMounts"].append(
        {"name": "migrate-password", "mountPath": "/var/run/secrets/admin", "readOnly": True})),
    "no egress to the database": ("egress to the database", _drop_db_egress),
}
SQLITE_MUTATIONS = {
    "SQLite with two replicas": ("one replica", lambda o: _pod(o)[0]["spec"].update(replicas=2)),
    "SQLite file off the volume": (
        "is on a volume", lambda o: _set_env(_sidecar(o), "DATABASE_URL", "sqlite:///var/lib/x.db")),
    "SQLite given a PodDisruptionBudget": ("allows an eviction", lambda o: o.append({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "x"},
        "spec": {"minAvailable": 1, "unhealthyPodEvictionPolicy": "AlwaysAllow",
                 "selector": {"matchLabels": _pod(o)[0]["spec"]["selector"]["matchLabels"]}}})),
}
# Manifest files with a migrate Job (optional/migrate-job.yaml).
JOB_MUTATIONS = {
    "Job without its NetworkPolicy": (
        "restricts the Job's ingress and egress", lambda o: o.remove(_of_kind(o, "NetworkPolicy"))),
    "Job NetworkPolicy admits ingress": (
        "admit no ingress", lambda o: _of_kind(o, "NetworkPolicy")["spec"].update(ingress=[{}])),
    "Job egress to every port": ("DNS and the database only", lambda o: _of_kind(o, "NetworkPolicy")["spec"][
        "egress"].append({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]})),
    "Job without TLS": ("verifies the server", lambda o: _set_env(
        _of_kind(o, "Job")["spec"]["template"]["spec"]["containers"][0], "MIGRATE_DB_SSLMODE", "prefer")),
}


def scrape_targets(renders: dict[str, list[dict]]) -> list[dict]:
    """The sidecar's metrics Services (the ServiceMonitor's targets), with the
    admin port they must reach, from every deployable render."""
    out, seen = [], set()
    for objs in renders.values():
        for obj in objs:
            got = pod_specs(obj)
            if got is None:
                continue
            pod, labels, _ = got
            containers = (pod.get("initContainers") or []) + (pod.get("containers") or [])
            sidecar = next((c for c in containers if is_docsidecar(c) and command_of(c) == "serve"), None)
            if sidecar is None:
                continue
            admin = listen_port(env_map(sidecar).get("DOCSIDECAR_ADMIN_LISTEN", ""))
            for svc in (o for o in objs if o.get("kind") == "Service"):
                sel = (svc.get("spec") or {}).get("selector") or {}
                key = json.dumps([svc, admin], sort_keys=True)  # the overlays share base's Service
                if sel and all(labels.get(k) == v for k, v in sel.items()) and key not in seen:
                    seen.add(key)
                    out.append({"service": svc, "admin_port": admin, "containers": containers})
    return out


def mutation_checks(rep: Report, where: str, objs: list[dict], secret_examples: dict, mutations: dict,
                    deployable: bool = True, targets: list[dict] | None = None) -> None:
    for label, (expected, mutate) in mutations.items():
        broken = copy.deepcopy(objs)
        scratch = Report(quiet=True)
        try:
            mutate(broken)
        except (StopIteration, KeyError, IndexError, ValueError, TypeError) as e:
            rep.check(f"{where}: mutation '{label}' applies", False, f"{type(e).__name__} {e}")
            continue
        schema_checks(scratch, where, broken)
        render_checks(scratch, where, broken, deployable, secret_examples, targets)
        rep.check(f"{where}: mutation '{label}' is caught by the '{expected}' check",
                  any(expected in f for f in scratch.failures),
                  f"failures were {scratch.failures or 'none'}")


# --------------------------------------------------------------------------


def main() -> int:
    verbose = "-v" in sys.argv[1:]
    start = time.monotonic()
    rep = Report(verbose=verbose)

    kdirs = sorted({p.parent for name in KUSTOMIZATION_NAMES for p in DEPLOY.rglob(name)})
    rep.check("deploy/ has kustomizations", bool(kdirs), f"none under {DEPLOY}")
    included: set[Path] = set()
    patches: set[Path] = set()
    resource_files: set[Path] = set()
    for d in kdirs:
        patches |= patch_files(d)
        k = load_yaml_docs(kustomization_file(d))[0]
        for r in k.get("resources") or []:
            p = (d / r).resolve()
            (included if p.is_dir() else resource_files).add(p)

    # Example secrets, by overlay directory: what an operator is told to create.
    yaml_files = sorted(p.resolve() for p in DEPLOY.rglob("*.y*ml") if p.name not in KUSTOMIZATION_NAMES)
    examples: dict[Path, dict] = {}
    for f in yaml_files:
        if f.name.endswith(".example.yaml"):
            try:
                examples.setdefault(f.parent, {}).update(secret_example_checks(rep, f, load_yaml_docs(f)))
            except yaml.YAMLError as e:
                rep.check(f"{f.relative_to(ROOT)}: parses", False, str(e))

    renders: dict[str, list[dict]] = {}
    for d in kdirs:
        where = str(d.relative_to(ROOT))
        try:
            objs = render(d)
        except (RenderError, yaml.YAMLError, OSError) as e:
            rep.check(f"{where}: renders", False, str(e))
            continue
        rep.check(f"{where}: renders ({len(objs)} objects)", True)
        renders[where] = objs
        ref = reference_render(d)
        if ref is None:
            print(f"note  {where}: neither kustomize nor kubectl on PATH: built-in render not cross-checked")
        else:
            tool, robjs = ref
            if robjs and "__error__" in robjs[0]:
                rep.check(f"{where}: {tool} renders", False, robjs[0]["__error__"])
            else:
                mine = {res_id(o): o for o in objs}
                theirs = {res_id(o): o for o in robjs}
                diff = ""
                if set(mine) != set(theirs):
                    diff = f"objects differ: {sorted(map(str, set(mine) ^ set(theirs)))}"
                else:
                    for rid in mine:
                        d_ = first_difference(mine[rid], theirs[rid])
                        if d_:
                            diff = f"{rid[1]}/{rid[3]}{d_}"
                            break
                rep.check(f"{where}: built-in render equals `{tool}`", not diff, diff)

    deployable_dirs = {str(d.relative_to(ROOT)) for d in kdirs if d.resolve() not in included}
    targets = scrape_targets({w: o for w, o in renders.items() if w in deployable_dirs})
    for where, objs in renders.items():
        d = ROOT / where
        deployable = where in deployable_dirs
        schema_checks(rep, where, objs)
        render_checks(rep, where, objs, deployable, examples.get(d.resolve(), {}), targets)
        if not deployable:
            continue
        if any(o.get("kind") == "Deployment" for o in objs):
            extra = NETWORKED_MUTATIONS if any(
                is_docsidecar(c) and command_of(c) == "migrate" for c in all_containers_anywhere(objs)) \
                else SQLITE_MUTATIONS
            mutation_checks(rep, where, objs, examples.get(d.resolve(), {}), {**MUTATIONS, **extra})
        if monitoring.has_monitoring(objs):
            mutation_checks(rep, where, objs, {}, monitoring.MUTATIONS, targets=targets)
    monitoring.rule_test_file_checks(rep)

    # Every other manifest file: example secrets, optional manifests, and the
    # files the kustomizations include (validated on their own too).
    for f in yaml_files:
        if f in patches:
            continue
        where = str(f.relative_to(ROOT))
        try:
            objs = load_yaml_docs(f)
        except yaml.YAMLError as e:
            rep.check(f"{where}: parses", False, str(e))
            continue
        if not all(isinstance(o, dict) and "kind" in o for o in objs):
            rep.check(f"{where}: holds Kubernetes objects", False, "not a manifest and not used as a patch")
            continue
        schema_checks(rep, where, objs)
        if f not in resource_files:
            render_checks(rep, where, objs, False, {})
            if any(o.get("kind") == "Job" for o in objs):
                mutation_checks(rep, where, objs, {}, JOB_MUTATIONS, deployable=False)

    elapsed = time.monotonic() - start
    if rep.failures:
        print(f"\n{len(rep.failures)} failure(s); renders: {', '.join(renders) or 'none'}")
    print(f"({elapsed:.1f} s, schemas: kubernetes-validate {kubernetes_validate.__version__}, "
          f"Kubernetes {' and '.join(K8S_VERSIONS)})")
    print(f"deploy: {rep.passed} passed, {len(rep.failures)} failed")
    return 1 if rep.failures else 0


if __name__ == "__main__":
    sys.exit(main())
