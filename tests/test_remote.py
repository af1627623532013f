"""States that travel (issue 22): a remote cache in an OCI registry, and bundles for air-gapped
machines. Two engines on separate stores play machine A and machine B (the same ``--version``,
so the same scripts give the same state ids on both). Needs Debian's ``docker-registry`` on
127.0.0.1:5000 (anonymous) and on 127.0.0.1:5001 (htpasswd basic auth), both started by
scripts/setup-registry.sh, and Debian's ``skopeo``.

Every test pushes to a repository of its own (``sqlrs-remote-test/<random hex>``), so no test
sees another's states. The hostile-input tests push hand-made artifacts with the small
distribution-protocol client below (blob upload POST + PUT, manifest PUT) under the tag B looks
for: a copy of A's real artifact with one thing wrong."""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import http.client
import http.server
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    ITEMS_SCHEMA,
    ROOT,
    RUNTIMES,
    EngineProcess,
    assert_error,
    assert_json,
    job_to_end,
    killed_at,
    poll,
    psql,
    state_dirs,
    without_warm_pool,
)

REGISTRY = "127.0.0.1:5000"
AUTH_REGISTRY = "127.0.0.1:5001"
AUTH_USER = "sqlrs-test"
AUTH_PASSWORD = "sqlrs-test-secret"
VERSION = "remote-test-22"
SETUP_HINT = "run scripts/setup-registry.sh"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
LABEL_ID = "dev.sqlrs.state.id"
LABEL_PARENT = "dev.sqlrs.state.parent"
LABEL_IMAGE = "dev.sqlrs.state.image"
LABEL_VERSION = "dev.sqlrs.engine.version"
LAYER_STATE = "dev.sqlrs.state.id"  # the annotation of a layer that belongs to a state
REF_NAME = "org.opencontainers.image.ref.name"

PUSH_DEADLINE = 240.0
JOB_DEADLINE = 300.0
DATA_SQL = "insert into items select g, 'item ' || g from generate_series(1, 1000) g;\n"
CHANGED_SQL = "insert into items select g, 'changed ' || g from generate_series(1, 50) g;\n"
FINGERPRINT = "select count(*), coalesce(sum(id), 0), md5(coalesce(string_agg(label, ',' " \
              "order by id), '')) from items"
EVIL = "sqlrs-evil"  # every hostile member's name starts with it


# ------------------------------------------------------------------------------ registry client


@dataclass
class Registry:
    """A minimal client of the distribution protocol (what the tests need to read artifacts
    and to push hand-made ones), optionally with basic auth."""

    address: str
    auth: tuple[str, str] | None = None

    def request(self, method: str, url: str, data: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        if not url.startswith("http"):
            url = f"http://{self.address}{url}"
        hdrs = dict(headers or {})
        if self.auth:
            token = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
            hdrs["Authorization"] = f"Basic {token}"
        request = urllib.request.Request(url, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return (int(response.status), {k.lower(): v for k, v in response.getheaders()},
                        response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()

    def push_blob(self, repo: str, data: bytes) -> str:
        """Upload ``data`` (monolithic: POST, then PUT with the digest); its digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        status, headers, body = self.request("POST", f"/v2/{repo}/blobs/uploads/", b"")
        assert status == 202, (status, body[:300])
        location = urllib.parse.urljoin(f"http://{self.address}/", headers["location"])
        sep = "&" if "?" in location else "?"
        status, _, body = self.request(
            "PUT", f"{location}{sep}digest={urllib.parse.quote(digest)}", data,
            {"Content-Type": "application/octet-stream"})
        assert status == 201, (status, body[:300])
        return digest

    def push_manifest(self, repo: str, tag: str, manifest: dict[str, Any]) -> None:
        status, _, body = self.request("PUT", f"/v2/{repo}/manifests/{tag}",
                                       json.dumps(manifest).encode(),
                                       {"Content-Type": OCI_MANIFEST})
        assert status == 201, (status, body[:500])

    def manifest(self, repo: str, tag: str) -> dict[str, Any] | None:
        status, _, body = self.request("GET", f"/v2/{repo}/manifests/{tag}",
                                       headers={"Accept": OCI_MANIFEST})
        if status == 404:
            return None
        assert status == 200, (status, body[:300])
        found: dict[str, Any] = json.loads(body)
        return found

    def blob(self, repo: str, digest: str) -> bytes:
        status, _, body = self.request("GET", f"/v2/{repo}/blobs/{digest}")
        assert status == 200, (status, body[:300])
        return body

    def tags(self, repo: str) -> list[str]:
        status, _, body = self.request("GET", f"/v2/{repo}/tags/list")
        if status == 404:
            return []
        assert status == 200, (status, body[:300])
        return list(json.loads(body).get("tags") or [])


@dataclass
class Artifact:
    """One state's artifact, read whole: its manifest, its config and its layers' bytes."""

    manifest: dict[str, Any]
    config: dict[str, Any]
    layers: list[bytes]

    @classmethod
    def fetch(cls, registry: Registry, repo: str, tag: str) -> Artifact:
        manifest = registry.manifest(repo, tag)
        assert manifest is not None, f"{repo}:{tag} is not in {registry.address}"
        config = json.loads(registry.blob(repo, manifest["config"]["digest"]))
        layers = [registry.blob(repo, d["digest"]) for d in manifest["layers"]]
        return cls(manifest, config, layers)

    def top(self, state_id: str) -> int:
        """The index of the layer that state ``state_id`` adds (the last one if none says)."""
        owned = [i for i, d in enumerate(self.manifest["layers"])
                 if (d.get("annotations") or {}).get(LAYER_STATE) == state_id]
        return owned[-1] if owned else len(self.layers) - 1

    def push(self, registry: Registry, repo: str, tag: str,
             declared_sizes: dict[int, int] | None = None) -> None:
        """Push it as it is now: blobs first, the config's diff_ids and the manifest's
        descriptors recomputed from the bytes (``declared_sizes`` overrides a layer's size)."""
        manifest = copy.deepcopy(self.manifest)
        config = copy.deepcopy(self.config)
        digests = [registry.push_blob(repo, layer) for layer in self.layers]
        if len(config.get("rootfs", {}).get("diff_ids") or []) == len(digests):
            config["rootfs"]["diff_ids"] = digests  # uncompressed layers: diff id = digest
        config_bytes = json.dumps(config).encode()
        manifest["config"] = {**manifest["config"], "size": len(config_bytes),
                              "digest": registry.push_blob(repo, config_bytes)}
        for index, (desc, digest, layer) in enumerate(
                zip(manifest["layers"], digests, self.layers, strict=True)):
            desc["digest"] = digest
            desc["size"] = (declared_sizes or {}).get(index, len(layer))
        registry.push_manifest(repo, tag, manifest)


def with_members(layer: bytes, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """``layer`` (a tar) with ``members`` appended after all of its own."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(layer)) as src, \
            tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as dst:
        for member in src:
            dst.addfile(member, src.extractfile(member) if member.isreg() else None)
        for info, data in members:
            if data is not None:
                info.size = len(data)
            dst.addfile(info, io.BytesIO(data) if data is not None else None)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as check:
        written = [m.name for m in check]
    assert [m.name for m, _ in members] == written[-len(members):], written[-len(members):]
    return out.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644,
           linkname: str = "", device: tuple[int, int] = (0, 0)) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, linkname
    info.devmajor, info.devminor = device
    info.uid = info.gid = os.getuid()
    return info


def new_repo() -> str:
    return f"sqlrs-remote-test/{secrets.token_hex(8)}"


def http_status(url: str) -> tuple[int | None, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), {k.lower(): v for k, v in response.getheaders()}
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}
    except (urllib.error.URLError, OSError):
        return None, {}


def free_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------------ engine helpers


def machine(engine_factory: Any, tmp_path: Path, name: str, url: str | None = None,
            env: dict[str, str] | None = None, **remote: Any) -> EngineProcess:
    """An engine on a store of its own (``tmp_path/name``), with the tests' version, no warm
    pool, and ``cache.remote.url`` (when given) and the other ``cache.remote.*`` settings."""
    engine: EngineProcess = engine_factory(f"--version={VERSION}", state_dir=tmp_path / name,
                                           env=env)
    without_warm_pool(engine)
    if url is not None:
        remote = {"url": url, **remote}
    for key, value in remote.items():
        set_config(engine, f"cache.remote.{key}", value)
    return engine


def set_config(engine: EngineProcess, path: str, value: Any) -> None:
    result = engine.request("PATCH", "/v1/config", {"path": path, "value": value})
    assert result.status == 200, (path, value, result.body)


def write_scripts(root: Path, **texts: str) -> dict[str, str]:
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, text in texts.items():
        path = root / f"{name}.sql"
        path.write_text(text)
        paths[name] = str(path)
    return paths


def psql_args(*paths: str) -> list[str]:
    return [arg for path in paths for arg in ("-f", path)]


def run_job(engine: EngineProcess, args: list[str],
            deadline_s: float = JOB_DEADLINE) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Prepare ``args``; the finished job and its whole events stream."""
    return job_to_end(engine, engine.submit(args), deadline_s)


def succeeded(engine: EngineProcess, args: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Prepare ``args``, which must succeed; the job and its log messages."""
    job, events = run_job(engine, args)
    messages = log_messages(events)
    assert job["status"] == "succeeded", (job.get("error"), messages[-10:])
    return job, messages


def log_messages(events: list[dict[str, Any]]) -> list[str]:
    return [str(e.get("message", "")) for e in events if e["type"] == "log"]


def pulls(messages: list[str]) -> list[str]:
    return [m for m in messages if m.startswith("remote: pull ")]


def psql_runs(messages: list[str]) -> list[str]:
    return [m for m in messages if m == "psql: start"]


def explain_steps(engine: EngineProcess, args: list[str]) -> list[dict[str, Any]]:
    """``POST /v1/cache/explain/prepare``'s steps for ``args``."""
    explained = engine.post("/v1/cache/explain/prepare", {
        "prepare_kind": "psql", "image_id": engine.image, "psql_args": args})
    assert explained.status == 200, explained.body
    steps: list[dict[str, Any]] = explained.json()["steps"]
    return steps


def chain_ids(engine: EngineProcess, args: list[str]) -> list[str]:
    """The state ids of the prepare's steps, first to last."""
    return [str(step["state_id"]) for step in explain_steps(engine, args)]


def state(engine: EngineProcess, state_id: str) -> dict[str, Any]:
    found = engine.get(f"/v1/states/{state_id}")
    assert found.status == 200, (state_id, found.body)
    entry: dict[str, Any] = found.json()
    return entry


def listed(engine: EngineProcess) -> list[str]:
    return sorted(str(s["state_id"]) for s in engine.get("/v1/states").json())


def wait_pushed(engine: EngineProcess, state_ids: list[str]) -> None:
    """Poll ``GET /v1/states/{id}`` until every state's push_status is "pushed"."""
    def pushed() -> bool:
        entries = [state(engine, sid) for sid in state_ids]
        for entry in entries:
            assert entry.get("push_status") != "failed", entry
        return all(e.get("push_status") == "pushed" for e in entries)

    poll(pushed, PUSH_DEADLINE, interval=0.1, what=f"{len(state_ids)} states to be pushed")


def fingerprint(dsn: str) -> str:
    return psql(dsn, FINGERPRINT)


def new_instance_dsn(engine: EngineProcess, state_id: str) -> str:
    made = engine.post("/v1/instances", {"state_id": state_id}, timeout=300)
    assert made.status == 201, made.body
    return str(made.json()["dsn"])


def export_bundle(engine: EngineProcess, state_id: str, path: Path) -> bytes:
    result = engine.get(f"/v1/states/{state_id}/export", timeout=300)
    assert result.status == 200, result.body[:500]
    assert result.headers.get("content-type", "").split(";")[0] == "application/x-tar"
    path.write_bytes(result.body)
    return result.body


def import_bundle(engine: EngineProcess, data: bytes) -> dict[str, Any]:
    result = engine.request("POST", "/v1/states/import", raw=data,
                            headers={"Content-Type": "application/x-tar"}, timeout=300)
    body: dict[str, Any] = assert_json(result, 200)
    assert set(body) >= {"imported", "present"}, body
    return body


def bundle_refs(data: bytes) -> list[str]:
    """The ref names of the manifests in an OCI-layout tar (checking its layout on the way)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as bundle:
        names = {m.name.removeprefix("./") for m in bundle}
        assert {"oci-layout", "index.json"} <= names, sorted(names)[:20]
        layout = bundle.extractfile(next(m for m in bundle
                                         if m.name.removeprefix("./") == "oci-layout"))
        assert layout is not None
        assert json.loads(layout.read())["imageLayoutVersion"] == "1.0.0"
        index_file = bundle.extractfile(next(m for m in bundle
                                             if m.name.removeprefix("./") == "index.json"))
        assert index_file is not None
        index = json.loads(index_file.read())
    refs = []
    for desc in index["manifests"]:
        assert desc["mediaType"] == OCI_MANIFEST, desc
        assert f"blobs/sha256/{desc['digest'].split(':', 1)[1]}" in names, desc
        refs.append(str((desc.get("annotations") or {}).get(REF_NAME)))
    return refs


def engine_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sqlrs_engine", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)


def skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    assert shutil.which("skopeo"), "skopeo missing: apt-get install skopeo"
    result = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, f"skopeo {' '.join(args)}: {result.stderr.strip()}"
    return result


def no_half_states(engine: EngineProcess) -> None:
    """The store holds exactly the listed states' directories and nothing half published
    (nor a pull's work directory, under ``remote/``)."""
    assert state_dirs(engine) == listed(engine)
    assert not list(engine.store.rglob(".tmp-*"))
    assert not list(engine.store.glob("remote/tmp-*"))


def assert_secret_nowhere(engine: EngineProcess, events: list[dict[str, Any]]) -> None:
    """The registry password is in none of the engine's logs, its config, its state.db, its
    argv, nor the job's events."""
    secret = AUTH_PASSWORD.encode()
    encoded = base64.b64encode(f"{AUTH_USER}:{AUTH_PASSWORD}".encode())
    places = [*engine.state_dir.joinpath("logs").glob("*"), engine.store / "config.json",
              engine.store / "state.db"]
    for place in places:
        if place.is_file():
            data = place.read_bytes()
            assert secret not in data and encoded not in data, place
    assert AUTH_PASSWORD not in json.dumps(events)
    if engine.proc.poll() is None:
        assert secret not in Path(f"/proc/{engine.proc.pid}/cmdline").read_bytes()


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def registry(runtime_image: str) -> Registry:
    """The anonymous registry on 127.0.0.1:5000 (a missing one fails the test)."""
    status = poll(lambda: http_status(f"http://{REGISTRY}/v2/")[0], 10.0, interval=0.5,
                  what=f"a registry on {REGISTRY} ({SETUP_HINT})")
    assert status == 200, f"{REGISTRY}/v2/ answered {status}: {SETUP_HINT}"
    return Registry(REGISTRY)


@pytest.fixture
def auth_registry(runtime_image: str) -> Registry:
    """The htpasswd registry on 127.0.0.1:5001: 401 with a Basic challenge without
    credentials, 200 with the test user's."""
    def answer() -> tuple[int | None, dict[str, str]] | None:
        found = http_status(f"http://{AUTH_REGISTRY}/v2/")
        return found if found[0] is not None else None

    status, headers = poll(answer, 10.0, interval=0.5,
                           what=f"a registry on {AUTH_REGISTRY} ({SETUP_HINT})")
    assert status == 401, f"{AUTH_REGISTRY}/v2/ answered {status} without credentials"
    assert headers.get("www-authenticate", "").lower().startswith("basic"), headers
    client = Registry(AUTH_REGISTRY, (AUTH_USER, AUTH_PASSWORD))
    assert client.request("GET", "/v2/")[0] == 200, "the test user is refused: " + SETUP_HINT
    return client


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    """A directory outside every store that hostile artifacts aim at; ``target`` is a file in
    it that must keep its content and its single link."""
    root = tmp_path / "canary"
    root.mkdir()
    (root / "target").write_text("canary\n")
    return root


# ========================================================================== config (one runtime)


REMOTE_DEFAULTS = {"url": "", "pull": True, "push": False, "insecure": False}


def config_url(path: str, effective: bool = False) -> str:
    query = {"path": path, **({"effective": "true"} if effective else {})}
    return f"/v1/config?{urllib.parse.urlencode(query)}"


def test_remote_config_defaults_and_schema(engine: EngineProcess) -> None:
    for key, value in REMOTE_DEFAULTS.items():
        got = engine.get(config_url(f"cache.remote.{key}", effective=True))
        assert assert_json(got, 200)["value"] == value, key
    schema = assert_json(engine.get("/v1/config/schema"), 200)
    remote = schema["properties"]["cache"]["properties"]["remote"]["properties"]
    assert set(remote) >= set(REMOTE_DEFAULTS), remote
    status = assert_json(engine.get("/v1/cache/status"), 200)  # the remote's fields: absent
    assert status.get("remote_url") in ("", None), status      # or empty when it is off
    assert not status.get("remote_pushes_pending") and not status.get("remote_pushes_failed")


@pytest.mark.parametrize(("key", "value"), [
    ("url", "127.0.0.1:5000/team/sqlrs-states"),
    ("url", "localhost:5000/x"),
    ("url", "registry.example.com/a/b-c_d.e"),
    ("url", ""),
    ("pull", False),
    ("push", True),
    ("insecure", True),
])
def test_valid_remote_config_values(engine: EngineProcess, key: str, value: Any) -> None:
    path = f"cache.remote.{key}"
    patched = engine.request("PATCH", "/v1/config", {"path": path, "value": value})
    assert assert_json(patched, 200) == {"path": path, "value": value}
    assert assert_json(engine.get(config_url(path, effective=True)), 200)["value"] == value
    if key == "url" and value:
        assert assert_json(engine.get("/v1/cache/status"), 200)["remote_url"] == value


@pytest.mark.parametrize(("key", "value"), [
    ("url", "http://x"),
    ("url", "https://127.0.0.1:5000/x"),
    ("url", " a b"),
    ("url", "127.0.0.1:5000/a b"),
    ("url", "127.0.0.1:5000/Team"),
    ("url", 5),
    ("pull", "yes"),
    ("push", 1),
    ("insecure", None),
])
def test_invalid_remote_config_values_are_400(engine: EngineProcess, key: str,
                                              value: Any) -> None:
    result = engine.request("PATCH", "/v1/config", {"path": f"cache.remote.{key}",
                                                    "value": value})
    assert_error(result, 400, "invalid_argument", "invalid config value")
    assert engine.get("/v1/config").json() == {}


def test_import_of_a_broken_bundle_is_400(engine: EngineProcess) -> None:
    for data in (b"not a tar at all", b"\0" * 10240):
        result = engine.request("POST", "/v1/states/import", raw=data,
                                headers={"Content-Type": "application/x-tar"})
        assert_error(result, 400)
    assert listed(engine) == []
    assert state_dirs(engine) == []


# ========================================================================== both runtimes


@RUNTIMES
def test_b_gets_every_state_from_the_registry_with_no_psql_run(
        engine_factory: Any, registry: Registry, tmp_path: Path) -> None:
    repo = new_repo()
    url = f"{REGISTRY}/{repo}"
    sql = write_scripts(tmp_path / "sql", schema=ITEMS_SCHEMA, data=DATA_SQL)
    args = psql_args(sql["schema"], sql["data"])
    a = machine(engine_factory, tmp_path, "a", url, push=True)
    b = machine(engine_factory, tmp_path, "b", url)

    built, messages = succeeded(a, args)
    assert len(psql_runs(messages)) == 2, messages
    ids = chain_ids(a, args)
    assert ids[-1] == built["result"]["state_id"]
    wait_pushed(a, ids)
    for sid in ids:
        assert state(a, sid)["origin"] == "built"
    status = a.get("/v1/cache/status").json()
    assert status["remote_url"] == url
    assert status["remote_pushes_pending"] == status["remote_pushes_failed"] == 0, status
    assert set(registry.tags(repo)) >= set(ids)

    # the artifact is a standard OCI image: manifest, config labels, uncompressed layers
    top = Artifact.fetch(registry, repo, ids[-1])
    assert top.manifest["mediaType"] == OCI_MANIFEST
    assert top.manifest["config"]["mediaType"] == OCI_CONFIG
    assert all(d["mediaType"] == OCI_LAYER for d in top.manifest["layers"])
    labels = top.config["config"]["Labels"]
    assert labels[LABEL_ID] == ids[-1] and labels[LABEL_PARENT] == ids[0], labels
    assert labels[LABEL_IMAGE] == state(a, ids[-1])["image_id"], labels
    assert labels[LABEL_VERSION] == VERSION, labels
    assert top.config["os"] and top.config["architecture"] and top.config["rootfs"]["diff_ids"]
    for layer in top.layers:
        with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
            assert all(not m.name.startswith("/") and ".." not in m.name.split("/")
                       for m in tar), "a member with an absolute or '..' path"

    # B: cache explain says the steps come from the remote; the prepare runs no psql
    steps = explain_steps(b, args)
    assert [s["state_id"] for s in steps] == ids
    assert [(s["cached"], s.get("remote")) for s in steps] == [(False, True)] * 2, steps
    job, messages = succeeded(b, args)
    assert pulls(messages), messages
    assert psql_runs(messages) == [], messages
    assert not any(m.startswith(("remote: refused", "remote: unavailable")) for m in messages)
    assert job["result"]["state_id"] == ids[-1]
    assert fingerprint(job["result"]["dsn"]) == fingerprint(built["result"]["dsn"])
    assert listed(b) == sorted(ids)
    for sid in ids:
        entry = state(b, sid)
        assert entry["origin"] == "pulled", entry
        assert entry.get("parent_state_id") == state(a, sid).get("parent_state_id")
    # a state pulled is a full citizen: a new instance of the middle state has the schema only
    assert psql(new_instance_dsn(b, ids[0]), "select count(*) from items") == "0"
    no_half_states(b)


@RUNTIMES
def test_b_with_one_script_changed_pulls_the_prefix_and_builds_the_rest(
        engine_factory: Any, registry: Registry, tmp_path: Path) -> None:
    repo = new_repo()
    url = f"{REGISTRY}/{repo}"
    sql = write_scripts(tmp_path / "sql", a=ITEMS_SCHEMA, b=DATA_SQL, changed=CHANGED_SQL)
    a = machine(engine_factory, tmp_path, "a", url, push=True)
    b = machine(engine_factory, tmp_path, "b", url)
    a_args = psql_args(sql["a"], sql["b"])
    succeeded(a, a_args)
    a_ids = chain_ids(a, a_args)
    wait_pushed(a, a_ids)

    b_args = psql_args(sql["a"], sql["changed"])
    b_ids = chain_ids(b, b_args)
    assert b_ids[0] == a_ids[0] and b_ids[1] != a_ids[1]
    steps = explain_steps(b, b_args)
    assert steps[0].get("remote") is True and not steps[1].get("remote"), steps
    job, messages = succeeded(b, b_args)
    assert {m.split()[2] for m in pulls(messages)} == {a_ids[0]}, messages
    assert len(psql_runs(messages)) == 1, messages
    assert state(b, b_ids[0])["origin"] == "pulled"
    assert state(b, b_ids[1])["origin"] == "built"
    assert state(b, b_ids[1])["parent_state_id"] == b_ids[0]
    assert a_ids[1] not in listed(b)
    dsn = job["result"]["dsn"]
    assert psql(dsn, "select count(*), min(label) from items") == "50|changed 1"


def built_on_a(engine_factory: Any, tmp_path: Path) -> tuple[
        EngineProcess, EngineProcess, list[str], dict[str, Any], list[str]]:
    """Machines A and B without a registry, and the two-step chain built on A: (A, B, the
    prepare's arguments, A's job, the chain's state ids)."""
    sql = write_scripts(tmp_path / "sql", schema=ITEMS_SCHEMA, data=DATA_SQL)
    args = psql_args(sql["schema"], sql["data"])
    a = machine(engine_factory, tmp_path, "a")
    b = machine(engine_factory, tmp_path, "b")
    built, _ = succeeded(a, args)
    return a, b, args, built, chain_ids(a, args)


@RUNTIMES
def test_export_on_a_import_on_b_gives_the_same_states(engine_factory: Any,
                                                        tmp_path: Path) -> None:
    a, b, args, built, ids = built_on_a(engine_factory, tmp_path)

    data = export_bundle(a, ids[-1], tmp_path / "bundle.tar")
    assert sorted(bundle_refs(data)) == sorted(ids)
    first = import_bundle(b, data)
    assert sorted(first["imported"]) == sorted(ids) and first["present"] == [], first
    again = import_bundle(b, (tmp_path / "bundle.tar").read_bytes())
    assert again["imported"] == [] and sorted(again["present"]) == sorted(ids), again
    assert listed(b) == sorted(ids)
    for sid in ids:
        entry = state(b, sid)
        assert entry["origin"] == "imported", entry
        assert entry.get("parent_state_id") == state(a, sid).get("parent_state_id")
    no_half_states(b)

    steps = explain_steps(b, args)
    assert all(s["cached"] for s in steps), steps
    job, messages = succeeded(b, args)
    assert psql_runs(messages) == [] and pulls(messages) == [], messages
    assert job["result"]["state_id"] == ids[-1]
    assert fingerprint(job["result"]["dsn"]) == fingerprint(built["result"]["dsn"])


def test_a_bundle_whose_blob_does_not_match_its_digest_is_refused(engine_factory: Any,
                                                                  tmp_path: Path) -> None:
    """An exported bundle with one byte of its largest layer changed (its name, the digest,
    kept): the import is a 400 naming the blob, and nothing is published."""
    a, b, _args, _built, ids = built_on_a(engine_factory, tmp_path)
    data = export_bundle(a, ids[-1], tmp_path / "bundle.tar")
    members = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar:
            members.append((info, tar.extractfile(info).read() if info.isfile() else None))
    largest = max((m for m in members if m[1]), key=lambda m: len(m[1] or b""))
    spoiled = bytearray(largest[1] or b"")
    spoiled[len(spoiled) // 2] ^= 0xFF
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for info, content in members:
            body = bytes(spoiled) if info is largest[0] else content
            tar.addfile(info, io.BytesIO(body) if body is not None else None)
    result = b.request("POST", "/v1/states/import", raw=out.getvalue(),
                       headers={"Content-Type": "application/x-tar"})
    assert_error(result, 400)
    assert "does not match its digest" in result.json()["message"], result.body
    assert listed(b) == []
    no_half_states(b)


@RUNTIMES
def test_export_and_import_from_the_command_line(engine_factory: Any, tmp_path: Path) -> None:
    a, b, args, built, ids = built_on_a(engine_factory, tmp_path)
    bundle = tmp_path / "cli-bundle.tar"

    exported = engine_cli("export", ids[-1], "-o", str(bundle), "--engine-json",
                          str(a.engine_json))
    assert exported.returncode == 0, exported.stderr
    json.loads(exported.stdout)  # a JSON summary
    assert sorted(bundle_refs(bundle.read_bytes())) == sorted(ids)

    imported = engine_cli("import", str(bundle), "--engine-json", str(b.engine_json))
    assert imported.returncode == 0, imported.stderr
    summary = json.loads(imported.stdout)
    assert sorted(summary["imported"]) == sorted(ids), summary
    again = engine_cli("import", str(bundle), "--engine-json", str(b.engine_json))
    assert again.returncode == 0, again.stderr
    assert sorted(json.loads(again.stdout)["present"]) == sorted(ids)

    job, messages = succeeded(b, args)
    assert psql_runs(messages) == [] and pulls(messages) == [], messages
    assert fingerprint(job["result"]["dsn"]) == fingerprint(built["result"]["dsn"])

    missing = engine_cli("import", str(tmp_path / "no-such.tar"), "--engine-json",
                         str(b.engine_json))
    assert missing.returncode != 0
    assert len((missing.stderr + missing.stdout).strip().splitlines()) == 1, missing
    unknown = engine_cli("export", "f" * 64, "-o", str(tmp_path / "x.tar"), "--engine-json",
                         str(a.engine_json))
    assert unknown.returncode != 0
    assert len((unknown.stderr + unknown.stdout).strip().splitlines()) == 1, unknown


@RUNTIMES
@pytest.mark.parametrize("flags", [[], ["--preserve-digests"]], ids=["as-is", "preserve-digests"])
def test_skopeo_copies_a_bundle_into_the_registry_and_b_pulls_it(
        engine_factory: Any, registry: Registry, tmp_path: Path, flags: list[str]) -> None:
    """``skopeo copy`` as the spec gives it (into a registry, skopeo gzips uncompressed
    layers unless told to keep the digests), and with ``--preserve-digests``."""
    repo = new_repo()
    url = f"{REGISTRY}/{repo}"
    sql = write_scripts(tmp_path / "sql", schema=ITEMS_SCHEMA, data=DATA_SQL)
    args = psql_args(sql["schema"], sql["data"])
    a = machine(engine_factory, tmp_path, "a")
    b = machine(engine_factory, tmp_path, "b", url)
    built, _ = succeeded(a, args)
    ids = chain_ids(a, args)
    bundle = tmp_path / "bundle.tar"
    export_bundle(a, ids[-1], bundle)

    for sid in ids:
        skopeo("copy", *flags, "--dest-tls-verify=false", f"oci-archive:{bundle}:{sid}",
               f"docker://{url}:{sid}")
    inspected = json.loads(skopeo("inspect", "--tls-verify=false",
                                  f"docker://{url}:{ids[-1]}").stdout)
    assert inspected["Labels"][LABEL_ID] == ids[-1], inspected
    assert inspected["Labels"][LABEL_PARENT] == ids[0], inspected
    raw = json.loads(skopeo("inspect", "--raw", "--tls-verify=false",
                            f"docker://{url}:{ids[-1]}").stdout)
    assert raw["mediaType"] == OCI_MANIFEST, raw
    layer_types = {d["mediaType"] for d in raw["layers"]}

    job, messages = succeeded(b, args)
    assert pulls(messages) and psql_runs(messages) == [], (layer_types, messages)
    assert fingerprint(job["result"]["dsn"]) == fingerprint(built["result"]["dsn"])
    assert state(b, ids[-1])["origin"] == "pulled"

    # and out again: a bundle skopeo made from the registry imports on a third machine
    out = tmp_path / "from-registry.tar"
    skopeo("copy", *flags, "--src-tls-verify=false", f"docker://{url}:{ids[-1]}",
           f"oci-archive:{out}:{ids[-1]}")
    c = machine(engine_factory, tmp_path, "c")
    answer = import_bundle(c, out.read_bytes())
    assert ids[-1] in answer["imported"], answer
    job, messages = succeeded(c, args)
    assert psql_runs(messages) == [] and pulls(messages) == [], messages
    assert fingerprint(job["result"]["dsn"]) == fingerprint(built["result"]["dsn"])


# --------------------------------------------------------------------------- the auth registry


def pushed_to_auth_registry(engine_factory: Any, tmp_path: Path) -> tuple[
        str, list[str], dict[str, Any], list[str]]:
    """A (credentials in its environment) builds and pushes one state to a new repository of
    the auth registry: (url, args, A's job, state ids)."""
    url = f"{AUTH_REGISTRY}/{new_repo()}"
    sql = write_scripts(tmp_path / "sql", schema=ITEMS_SCHEMA, data=DATA_SQL)
    args = psql_args(sql["schema"], sql["data"])
    a = machine(engine_factory, tmp_path, "a", url, push=True, env={
        "SQLRS_REMOTE_USERNAME": AUTH_USER, "SQLRS_REMOTE_PASSWORD": AUTH_PASSWORD,
        "DOCKER_CONFIG": str(empty_docker_config(tmp_path / "a-docker"))})
    job, events = run_job(a, args)
    assert job["status"] == "succeeded", job.get("error")
    ids = chain_ids(a, args)
    wait_pushed(a, ids)
    assert_secret_nowhere(a, events)
    return url, args, job, ids


def empty_docker_config(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text("{}\n")
    return root


def assert_pulled_from_auth_registry(b: EngineProcess, args: list[str],
                                     built: dict[str, Any], ids: list[str]) -> None:
    job, events = run_job(b, args)
    messages = log_messages(events)
    assert job["status"] == "succeeded", (job.get("error"), messages[-10:])
    assert pulls(messages) and psql_runs(messages) == [], messages
    assert fingerprint(job["result"]["dsn"]) == fingerprint(built["result"]["dsn"])
    assert all(state(b, sid)["origin"] == "pulled" for sid in ids)
    assert_secret_nowhere(b, events)


@RUNTIMES
def test_auth_registry_with_credentials_from_the_docker_config(
        engine_factory: Any, auth_registry: Registry, tmp_path: Path) -> None:
    url, args, built, ids = pushed_to_auth_registry(engine_factory, tmp_path)
    docker_config = tmp_path / "b-docker"
    docker_config.mkdir()
    auth = base64.b64encode(f"{AUTH_USER}:{AUTH_PASSWORD}".encode()).decode()
    (docker_config / "config.json").write_text(
        json.dumps({"auths": {AUTH_REGISTRY: {"auth": auth}}}))
    b = machine(engine_factory, tmp_path, "b", url, env={"DOCKER_CONFIG": str(docker_config)})
    assert_pulled_from_auth_registry(b, args, built, ids)


@RUNTIMES
def test_auth_registry_with_credentials_from_the_environment(
        engine_factory: Any, auth_registry: Registry, tmp_path: Path) -> None:
    url, args, built, ids = pushed_to_auth_registry(engine_factory, tmp_path)
    b = machine(engine_factory, tmp_path, "b", url, env={
        "SQLRS_REMOTE_USERNAME": AUTH_USER, "SQLRS_REMOTE_PASSWORD": AUTH_PASSWORD,
        "DOCKER_CONFIG": str(empty_docker_config(tmp_path / "b-docker"))})
    assert_pulled_from_auth_registry(b, args, built, ids)


@RUNTIMES
def test_auth_registry_without_credentials_builds_locally(
        engine_factory: Any, auth_registry: Registry, tmp_path: Path) -> None:
    assert "SQLRS_REMOTE_USERNAME" not in os.environ and "SQLRS_REMOTE_PASSWORD" not in os.environ
    url, args, built, ids = pushed_to_auth_registry(engine_factory, tmp_path)
    b = machine(engine_factory, tmp_path, "b", url,
                env={"DOCKER_CONFIG": str(empty_docker_config(tmp_path / "b-docker"))})
    job, messages = succeeded(b, args)
    assert any(m.startswith("remote: unavailable") for m in messages), messages
    assert pulls(messages) == [] and len(psql_runs(messages)) == 2, messages
    assert all(state(b, sid)["origin"] == "built" for sid in ids)
    assert fingerprint(job["result"]["dsn"]) == fingerprint(built["result"]["dsn"])


# ------------------------------------------------------------------------------ hostile input


@dataclass
class Hostile:
    """How one test spoils A's real artifact of a state before pushing it for B."""

    spoil: Callable[[Artifact, str, Path], dict[int, int] | None]
    #: a word the refusal must name (the hostile member's prefix by default), so it is
    #: refused for what is wrong with it and not for something else
    names: str = EVIL


def appended(*make: Callable[[Path], tuple[tarfile.TarInfo, bytes | None]]) -> Callable[
        [Artifact, str, Path], dict[int, int] | None]:
    """Spoil the state's own layer: append the members ``make`` builds (given the canary)."""
    def spoil(artifact: Artifact, state_id: str, canary: Path) -> dict[int, int] | None:
        index = artifact.top(state_id)
        artifact.layers[index] = with_members(artifact.layers[index], [m(canary) for m in make])
        return None
    return spoil


def declared_smaller(artifact: Artifact, state_id: str, _canary: Path) -> dict[int, int] | None:
    index = artifact.top(state_id)
    return {index: max(1, len(artifact.layers[index]) // 2)}


def other_image(artifact: Artifact, _state_id: str, _canary: Path) -> dict[int, int] | None:
    labels = artifact.config["config"]["Labels"]
    image = str(labels[LABEL_IMAGE])
    labels[LABEL_IMAGE] = image[:-8] + ("0" * 8 if not image.endswith("0" * 8) else "1" * 8)
    return None


HOSTILE = {
    "absolute-path": Hostile(appended(
        lambda c: (member(str(c / f"{EVIL}-absolute")), b"pwned\n"))),
    "dotdot-path": Hostile(appended(
        lambda c: (member("../" * 40 + str(c / f"{EVIL}-dotdot")[1:]), b"pwned\n"))),
    "symlink-outside": Hostile(appended(
        lambda c: (member(f"{EVIL}-link", tarfile.SYMTYPE, 0o777, str(c)), None),
        lambda c: (member(f"{EVIL}-link/{EVIL}-through-link"), b"pwned\n"))),
    "hardlink-outside": Hostile(appended(
        lambda c: (member(f"{EVIL}-hardlink", tarfile.LNKTYPE, 0o644, str(c / "target")),
                   None))),
    "char-device": Hostile(appended(
        # /dev/null's numbers: a device, not an overlay whiteout (0/0)
        lambda c: (member(f"{EVIL}-chardev", tarfile.CHRTYPE, 0o666, device=(1, 3)), None))),
    "fifo": Hostile(appended(
        lambda c: (member(f"{EVIL}-fifo", tarfile.FIFOTYPE, 0o644), None))),
    "setuid": Hostile(appended(
        lambda c: (member(f"{EVIL}-setuid", mode=0o4755), b"#!/bin/sh\n"))),
    "declared-size-too-small": Hostile(declared_smaller, "size"),
    "other-image-label": Hostile(other_image, "image"),
}


def evil_paths(root: Path) -> list[str]:
    """Paths below ``root`` whose name starts with the hostile members' prefix."""
    found = []
    for directory, dirs, files in os.walk(root):
        found += [os.path.join(directory, n) for n in dirs + files if n.startswith(EVIL)]
    return found


@RUNTIMES
@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_artifact_is_refused_and_the_step_built_locally(
        engine_factory: Any, registry: Registry, tmp_path: Path, canary: Path,
        case: str) -> None:
    source, target = new_repo(), new_repo()
    sql = write_scripts(tmp_path / "sql", schema=ITEMS_SCHEMA)
    args = psql_args(sql["schema"])
    a = machine(engine_factory, tmp_path, "a", f"{REGISTRY}/{source}", push=True)
    built, _ = succeeded(a, args)
    state_id = built["result"]["state_id"]
    wait_pushed(a, [state_id])

    artifact = Artifact.fetch(registry, source, state_id)
    sizes = HOSTILE[case].spoil(artifact, state_id, canary)
    artifact.push(registry, target, state_id, sizes)

    b = machine(engine_factory, tmp_path, "b", f"{REGISTRY}/{target}")
    assert [s.get("remote") for s in explain_steps(b, args)] == [True]
    job, messages = succeeded(b, args)
    refused = [m for m in messages if m.startswith(f"remote: refused {state_id}:")]
    assert refused, messages
    assert HOSTILE[case].names in refused[0], refused
    assert len(psql_runs(messages)) == 1, messages
    assert state(b, state_id)["origin"] == "built"
    assert psql(job["result"]["dsn"], "select count(*) from items") == "0"
    # nothing got out, nothing hostile was kept, nothing is half published
    assert sorted(p.name for p in canary.iterdir()) == ["target"]
    assert (canary / "target").read_text() == "canary\n"
    assert (canary / "target").stat().st_nlink == 1
    assert evil_paths(b.state_dir) == []
    assert evil_paths(b.store) == []
    assert listed(b) == [state_id]
    no_half_states(b)


# --------------------------------------------------------------------------- interrupted pulls


@RUNTIMES
def test_a_kill_during_a_pull_leaves_no_half_state(engine_factory: Any, registry: Registry,
                                                   tmp_path: Path) -> None:
    repo = new_repo()
    url = f"{REGISTRY}/{repo}"
    sql = write_scripts(tmp_path / "sql", schema=ITEMS_SCHEMA, data=DATA_SQL)
    args = psql_args(sql["schema"], sql["data"])
    a = machine(engine_factory, tmp_path, "a", url, push=True)
    built, _ = succeeded(a, args)
    ids = chain_ids(a, args)
    wait_pushed(a, ids)
    expected = fingerprint(built["result"]["dsn"])

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    b = machine(engine_factory, tmp_path, "b", url, env={"SQLRS_TEST_HOOKS_DIR": str(hooks)})
    killed_at(b, hooks, "remote-pull-blob", "POST", "/v1/prepare-jobs", {
        "prepare_kind": "psql", "image_id": b.image, "psql_args": args})
    again: EngineProcess = engine_factory(f"--version={VERSION}", state_dir=b.state_dir)
    again.image = b.image
    # the interrupted job may be taken up again at start: let it end first
    for entry in again.get("/v1/prepare-jobs").json():
        finished = again.wait_job(entry["job_id"], JOB_DEADLINE)
        assert finished["status"] in ("succeeded", "failed"), finished
    assert set(listed(again)) <= set(ids)
    no_half_states(again)
    for sid in listed(again):  # each state listed is whole
        assert state(again, sid)["origin"] in ("pulled", "built")
        count = "0" if sid == ids[0] else "1000"
        assert psql(new_instance_dsn(again, sid), "select count(*) from items") == count
    job, _ = succeeded(again, args)
    assert fingerprint(job["result"]["dsn"]) == expected
    no_half_states(again)


@RUNTIMES
def test_a_kill_during_a_push_resumes_it_at_the_next_start(engine_factory: Any,
                                                          registry: Registry,
                                                          tmp_path: Path) -> None:
    """The push queue is in state.db: a kill -9 just before a manifest is put leaves no tag in
    the registry; the next start pushes every state, and B then pulls them."""
    repo = new_repo()
    url = f"{REGISTRY}/{repo}"
    sql = write_scripts(tmp_path / "sql", schema=ITEMS_SCHEMA, data=DATA_SQL)
    args = psql_args(sql["schema"], sql["data"])
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    a = machine(engine_factory, tmp_path, "a", url, env={"SQLRS_TEST_HOOKS_DIR": str(hooks)},
                push=True)
    (hooks / "remote-push-manifest").touch()
    built, _ = succeeded(a, args)  # the prepare never waits for its push
    ids = chain_ids(a, args)
    poll(lambda: (hooks / "remote-push-manifest.reached").exists(), 120,
         what="the push to reach its manifest")
    assert all(state(a, sid)["push_status"] == "pending" for sid in ids)
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(30)
    assert registry.tags(repo) == []
    again: EngineProcess = engine_factory(f"--version={VERSION}", state_dir=a.state_dir)
    wait_pushed(again, ids)
    assert sorted(registry.tags(repo)) == sorted(ids)
    b = machine(engine_factory, tmp_path, "b", url)
    job, messages = succeeded(b, args)
    assert pulls(messages) and not psql_runs(messages), messages
    assert fingerprint(job["result"]["dsn"]) == fingerprint(built["result"]["dsn"])


class DyingRegistry:
    """An HTTP proxy in front of the registry that stops in the middle of the first blob
    larger than ``threshold`` it serves: it sends the headers and half of the body, then
    closes the connection and stops listening, as a registry that went down mid-pull."""

    def __init__(self, upstream: str, threshold: int = 4096) -> None:
        self.upstream = upstream
        self.threshold = threshold
        self.died = threading.Event()
        self.served: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy.forward(self, "GET")

            def do_HEAD(self) -> None:
                proxy.forward(self, "HEAD")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def forward(self, handler: http.server.BaseHTTPRequestHandler, method: str) -> None:
        self.served.append(f"{method} {handler.path}")
        conn = http.client.HTTPConnection(self.upstream, timeout=60)
        try:
            headers = {k: v for k, v in handler.headers.items()
                       if k.lower() not in ("host", "connection")}
            conn.request(method, handler.path, headers=headers)
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        handler.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("connection", "transfer-encoding", "content-length"):
                handler.send_header(key, value)
        length = response.getheader("content-length") if method == "HEAD" else str(len(body))
        if length is not None:
            handler.send_header("Content-Length", length)
        handler.send_header("Connection", "close")
        handler.end_headers()
        if method == "HEAD":
            return
        big_blob = "/blobs/sha256:" in handler.path and len(body) > self.threshold
        if big_blob and not self.died.is_set():
            self.died.set()
            handler.wfile.write(body[:len(body) // 2])
            handler.wfile.flush()
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)
            threading.Thread(target=self.stop, daemon=True).start()
            return
        handler.wfile.write(body)

    def start(self) -> DyingRegistry:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def dying_registry(registry: Registry) -> Iterator[DyingRegistry]:
    proxy = DyingRegistry(registry.address).start()
    try:
        yield proxy
    finally:
        if not proxy.died.is_set():
            proxy.stop()


@RUNTIMES
def test_a_registry_that_stops_mid_pull_leaves_b_building_locally(
        engine_factory: Any, registry: Registry, dying_registry: DyingRegistry,
        tmp_path: Path) -> None:
    repo = new_repo()
    sql = write_scripts(tmp_path / "sql", schema=ITEMS_SCHEMA, data=DATA_SQL)
    args = psql_args(sql["schema"], sql["data"])
    a = machine(engine_factory, tmp_path, "a", f"{REGISTRY}/{repo}", push=True)
    built, _ = succeeded(a, args)
    ids = chain_ids(a, args)
    wait_pushed(a, ids)

    b = machine(engine_factory, tmp_path, "b", f"{dying_registry.address}/{repo}")
    job, messages = succeeded(b, args)
    assert dying_registry.died.is_set(), dying_registry.served
    # a registry that went away is "unavailable" (as one that is down from the start)
    assert any(m.startswith("remote: unavailable") for m in messages), messages
    assert psql_runs(messages), messages
    assert fingerprint(job["result"]["dsn"]) == fingerprint(built["result"]["dsn"])
    assert all(state(b, sid)["origin"] in ("built", "pulled") for sid in listed(b))
    assert state(b, ids[-1])["origin"] == "built"
    no_half_states(b)


# --------------------------------------------------------------------------------- pushes


@RUNTIMES
def test_a_push_to_nowhere_never_fails_the_prepare(engine_factory: Any, tmp_path: Path) -> None:
    url = f"127.0.0.1:{free_port()}/x"
    sql = write_scripts(tmp_path / "sql", schema=ITEMS_SCHEMA)
    a = machine(engine_factory, tmp_path, "a", url, push=True)
    job, messages = succeeded(a, psql_args(sql["schema"]))
    assert any(m.startswith("remote: unavailable") for m in messages), messages
    assert len(psql_runs(messages)) == 1, messages
    state_id = job["result"]["state_id"]

    def push_failed() -> dict[str, Any] | None:
        entry = state(a, state_id)
        return entry if entry.get("push_error") else None

    entry = poll(push_failed, PUSH_DEADLINE, interval=0.1, what="a push error")
    assert entry["push_status"] in ("pending", "failed"), entry
    assert isinstance(entry["push_error"], str) and entry["push_error"], entry
    assert entry["origin"] == "built"
    status = a.get("/v1/cache/status").json()
    assert status["remote_url"] == url
    assert status["remote_pushes_pending"] + status["remote_pushes_failed"] >= 1, status
    assert psql(job["result"]["dsn"], "select count(*) from items") == "0"
