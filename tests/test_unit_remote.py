"""The remote cache's pure parts: layer packing and checking, artifact parsing, the settings,
and the registry client's token flow against a minimal token-protected endpoint."""

from __future__ import annotations

import base64
import contextlib
import gzip
import http.server
import io
import json
import os
import stat
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import sqlrs_engine as se

pytestmark = pytest.mark.unit

ROOT = os.geteuid() == 0
STATE_A, STATE_B = "a" * 64, "b" * 64
IMAGE = "host:15.18@sha256:" + "c" * 64


# settings -----------------------------------------------------------------------------------
@pytest.mark.parametrize("url", ["", "127.0.0.1:5000/team/sqlrs-states", "localhost/x",
                                 "registry.example.com:443/a/b_c/d-e", "[::1]:5000/x"])
def test_valid_remote_urls(url: str) -> None:
    se.check_schema(url, se.schema_at(["cache", "remote", "url"]), "url")


@pytest.mark.parametrize("url", ["http://127.0.0.1:5000/x", "127.0.0.1:5000", " a b",
                                 "host/UPPER", "host/a//b", "host:99999999/x"])
def test_invalid_remote_urls(url: str) -> None:
    with pytest.raises(ValueError, match="repository"):
        se.check_schema(url, se.schema_at(["cache", "remote", "url"]), "url")


def test_remote_flags_are_booleans(tmp_path: Path) -> None:
    config = se.ConfigManager(str(tmp_path / "config.json"))
    assert config.value("cache.remote") == {"url": "", "pull": True, "push": False,
                                            "insecure": False}
    with pytest.raises(se.ApiError):
        config.set("cache.remote.push", 1)
    config.set("cache.remote.push", True)
    assert config.value("cache.remote.push") is True


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1:5000", True), ("localhost:5000", True), ("[::1]:5000", True),
    ("127.0.0.2", True), ("registry.example.com", False), ("10.0.0.1:5000", False)])
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert se.is_loopback_host(host) is loopback


def test_challenges_parse() -> None:
    assert se.parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry",'
        'scope="repository:a/b:pull"') == ("bearer", {
            "realm": "https://auth.example/token", "service": "registry",
            "scope": "repository:a/b:pull"})
    assert se.parse_challenge('Basic realm="sqlrs-test"') == ("basic", {"realm": "sqlrs-test"})


# layers -------------------------------------------------------------------------------------
def pack(directory: Path) -> bytes:
    out = io.BytesIO()
    se.write_layer(str(directory), out)
    return out.getvalue()


def names(layer: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        return tar.getnames()


def test_layers_are_deterministic_and_owned_by_nobody(tmp_path: Path) -> None:
    data = tmp_path / "pgdata"
    (data / "base" / "1").mkdir(parents=True)
    (data / "PG_VERSION").write_text("15\n")
    (data / "base" / "1" / "1259").write_bytes(os.urandom(9000))
    first = pack(data)
    assert first == pack(data)
    assert names(first) == ["PG_VERSION", "base", "base/1", "base/1/1259"]
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        assert {(m.uid, m.gid, m.uname, m.gname) for m in tar} == {(0, 0, "", "")}


def test_a_link_makes_a_state_not_portable(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "pg_tblspc").symlink_to("/elsewhere")
    with pytest.raises(se.RemoteError, match="not portable"):
        pack(tmp_path / "d")


@pytest.mark.skipif(not ROOT, reason="overlay whiteouts and trusted xattrs are root's")
def test_overlay_whiteouts_become_oci_whiteouts_and_apply(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    (upper / "opaque").mkdir(parents=True)
    (upper / "opaque" / "new").write_text("new")
    os.setxattr(upper / "opaque", "trusted.overlay.opaque", b"y")
    os.mknod(upper / "gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    (upper / "kept").write_text("changed")
    layer = pack(upper)
    assert names(layer) == [".wh.gone", "kept", "opaque", "opaque/.wh..wh..opq", "opaque/new"]
    lower = tmp_path / "lower"
    (lower / "opaque").mkdir(parents=True)
    (lower / "opaque" / "old").write_text("old")
    (lower / "gone").write_text("gone")
    (lower / "kept").write_text("kept")
    blob = tmp_path / "layer.tar"
    blob.write_bytes(layer)
    se.apply_layer(str(blob), se.scan_layer(str(blob)), str(lower))
    assert sorted(str(p.relative_to(lower)) for p in lower.rglob("*")) == [
        "kept", "opaque", "opaque/new"]
    assert (lower / "kept").read_text() == "changed"


def tar_with(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o600,
           linkname: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, linkname
    data = b"x" if kind == tarfile.REGTYPE else None
    info.size = len(data) if data else 0
    return info, data


@pytest.mark.parametrize(("bad", "reason"), [
    (member("/etc/cron.d/x"), "outside"),
    (member("base/../../x"), "outside"),
    (member("pg_tblspc/1", tarfile.SYMTYPE, linkname="/etc"), "links"),
    (member("inner", tarfile.SYMTYPE, linkname="PG_VERSION"), "links"),
    (member("copy", tarfile.LNKTYPE, linkname="/etc/shadow"), "links"),
    (member("dev", tarfile.CHRTYPE), "not a plain file"),
    (member("fifo", tarfile.FIFOTYPE), "not a plain file"),
    (member("bin", mode=0o4755), "set-id"),
    (member(".wh.dir/x"), "whiteout"),
    (member("d/.wh.."), "invalid whiteout"),
])
def test_hostile_layers_are_refused(tmp_path: Path, bad: tuple[tarfile.TarInfo, bytes | None],
                                    reason: str) -> None:
    blob = tmp_path / "layer.tar"
    blob.write_bytes(tar_with(member("PG_VERSION"), bad))
    with pytest.raises(se.RemoteError, match=reason) as caught:
        se.scan_layer(str(blob))
    assert caught.value.refused and caught.value.status == 400


def test_garbage_is_not_a_layer(tmp_path: Path) -> None:
    blob = tmp_path / "layer.tar"
    blob.write_bytes(b"\x01" * 1024)
    with pytest.raises(se.RemoteError, match=r"malformed tar header|not a valid tar"):
        se.scan_layer(str(blob))


def test_an_oversized_tar_header_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    info, data = member("PG_VERSION")
    info.pax_headers = {"comment": "x" * (se.MAX_TAR_HEADER + 1)}
    blob = tmp_path / "layer.tar"
    blob.write_bytes(tar_with((info, data)))
    with pytest.raises(se.RemoteError, match="oversized tar header"):
        se.scan_layer(str(blob))


# artifacts ----------------------------------------------------------------------------------
def artifact() -> se.Artifact:
    chain: list[se.ChainEntry | None] = [
        None, se.ChainEntry(STATE_A, None, "psql", "-f a.sql", "2026-01-01T00:00:00Z"),
        se.ChainEntry(STATE_B, STATE_A, "psql", "-f b.sql", "2026-01-01T00:00:01Z")]
    return se.Artifact(IMAGE, chain, [("sha256:" + str(n) * 64, n + 10) for n in range(3)])


def test_an_artifact_round_trips() -> None:
    art = artifact()
    config = art.config("dev")
    manifest = art.manifest(config)
    config_ref, layers, gzipped = se.parse_manifest(manifest)
    assert config_ref == (se.sha256_digest(config), len(config))
    assert se.parse_artifact(config, layers, gzipped, STATE_B, IMAGE) == art
    doc = json.loads(manifest)
    assert doc["layers"][0].get("annotations") is None
    assert doc["layers"][2]["annotations"] == {"dev.sqlrs.state.id": STATE_B}
    assert art.sub(1).state_id == STATE_A


def test_an_artifact_for_another_image_or_state_is_refused() -> None:
    art = artifact()
    config = art.config("dev")
    with pytest.raises(se.RemoteError, match="another image"):
        se.parse_artifact(config, art.layers, [False] * 3, STATE_B, "host:15.99@sha256:" + "d" * 64)
    with pytest.raises(se.RemoteError, match="another state"):
        se.parse_artifact(config, art.layers, [False] * 3, STATE_A, IMAGE)
    with pytest.raises(se.RemoteError, match="layers are not"):
        se.parse_artifact(config, art.layers[:2], [False] * 2, STATE_B, IMAGE)


def test_a_broken_chain_is_refused() -> None:
    art = artifact()
    top = art.chain[2]
    assert top is not None
    top.parent_state_id = "e" * 64
    with pytest.raises(se.RemoteError, match="chain of parents"):
        se.parse_artifact(art.config("dev"), art.layers, [False] * 3, STATE_B, IMAGE)


@pytest.mark.parametrize("manifest", [
    b"not json", b"[]", b'{"schemaVersion": 2, "layers": []}',
    json.dumps({"schemaVersion": 2, "config": {"mediaType": se.OCI_CONFIG, "digest": "md5:1",
                                               "size": 1},
                "layers": [{"mediaType": se.OCI_LAYER, "digest": "sha256:" + "0" * 64,
                            "size": 1}]}).encode(),
    json.dumps({"schemaVersion": 2, "config": {"mediaType": se.OCI_CONFIG,
                                               "digest": "sha256:" + "0" * 64, "size": 1},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
                            "digest": "sha256:" + "0" * 64, "size": 1}]}).encode(),
])
def test_malformed_manifests_are_refused(manifest: bytes) -> None:
    with pytest.raises(se.RemoteError) as caught:
        se.parse_manifest(manifest)
    assert caught.value.refused


def test_a_gzipped_layer_is_checked_against_its_diff_id(tmp_path: Path) -> None:
    layer = tar_with(member("PG_VERSION"))
    packed = tmp_path / "layer.gz"
    packed.write_bytes(gzip.compress(layer))
    out = se.gunzip_layer(str(packed), se.sha256_digest(layer), 1 << 20)
    assert Path(out).read_bytes() == layer
    packed.write_bytes(gzip.compress(layer))
    with pytest.raises(se.RemoteError, match="not what its config says"):
        se.gunzip_layer(str(packed), "sha256:" + "0" * 64, 1 << 20)
    packed.write_bytes(gzip.compress(b"\0" * 100_000))
    with pytest.raises(se.RemoteError, match="expands past"):
        se.gunzip_layer(str(packed), "sha256:" + "0" * 64, 50_000)


# the registry client's token flow -----------------------------------------------------------
@pytest.fixture
def token_registry() -> Iterator[Callable[[], str]]:
    """A minimal endpoint that answers /v2/<repo>/manifests/<tag> only with a token its
    /token endpoint gives for user:secret (the registry token flow, as Docker Hub does)."""
    calls: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            calls.append(self.path)
            port = self.server.server_address[1]
            if self.path.startswith("/token"):
                expected = "Basic " + base64.b64encode(b"user:secret").decode()
                ok = self.headers.get("Authorization") == expected
                body = json.dumps({"token": "tok"}).encode() if ok else b"{}"
                self.send_response(200 if ok else 401)
            elif self.headers.get("Authorization") == "Bearer tok":
                body = b'{"schemaVersion": 2}'
                self.send_response(200)
            else:
                body = b""
                self.send_response(401)
                self.send_header("WWW-Authenticate", f'Bearer realm="http://127.0.0.1:{port}'
                                 f'/token",service="test",scope="repository:r:pull"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield lambda: f"127.0.0.1:{server.server_address[1]}/r"
    server.shutdown()
    server.server_close()


def test_the_token_flow_with_credentials(token_registry: Callable[[], str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SQLRS_REMOTE_USERNAME", "user")
    monkeypatch.setenv("SQLRS_REMOTE_PASSWORD", "secret")
    client = se.RegistryClient(token_registry(), insecure=False)
    assert client.base().startswith("http://")  # loopback: plain HTTP when TLS is not there
    assert client.manifest("t") == b'{"schemaVersion": 2}'


def test_the_token_flow_refused_without_credentials(token_registry: Callable[[], str],
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    monkeypatch.delenv("SQLRS_REMOTE_USERNAME", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))  # an empty Docker config
    client = se.RegistryClient(token_registry(), insecure=False)
    with pytest.raises(se.RemoteError, match="refused a token") as caught:
        client.manifest("t")
    assert not caught.value.refused
    assert "secret" not in str(caught.value.body())


def test_credentials_never_go_to_another_host_over_http(
        token_registry: Callable[[], str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A realm on another host (``localhost`` is not ``127.0.0.1`` to the client) over plain
    HTTP gets no credentials: the token is refused, the password was not sent."""
    monkeypatch.setenv("SQLRS_REMOTE_USERNAME", "user")
    monkeypatch.setenv("SQLRS_REMOTE_PASSWORD", "secret")
    client = se.RegistryClient(token_registry().replace("127.0.0.1", "localhost"), False)
    client.base()
    client.host = client.host.replace("localhost", "127.0.0.1")  # realm names 127.0.0.1
    client._base = client._base.replace("localhost", "127.0.0.1") if client._base else None
    client._base = "http://localhost:" + client.host.split(":")[1]
    with pytest.raises(se.RemoteError, match="refused a token"):
        client.manifest("t")


def test_a_trickling_registry_is_cut_off(monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    """A registry that sends a byte now and then (each read within the read timeout) is cut
    off by the transfer's deadline, and a cancel ends a transfer at once."""

    class Trickle(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(1000):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        monkeypatch.setattr(se, "BLOB_GRACE_S", 1.0)
        client = se.RegistryClient(f"127.0.0.1:{server.server_address[1]}/r", False)
        started = time.monotonic()
        with pytest.raises(se.RemoteError, match="not received"):
            client.fetch_blob("sha256:" + "0" * 64, 1000, str(tmp_path / "blob"))
        assert time.monotonic() - started < 30

        def cancelled() -> None:
            raise se.JobCancelled()

        with pytest.raises(se.JobCancelled):
            client.fetch_blob("sha256:" + "0" * 64, 1000, str(tmp_path / "blob"), cancelled)
    finally:
        server.shutdown()
        server.server_close()


def test_credentials_from_the_docker_config(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SQLRS_REMOTE_USERNAME", raising=False)
    auth = base64.b64encode(b"u:p").decode()
    (tmp_path / "config.json").write_text(json.dumps({"auths": {"127.0.0.1:5001": {
        "auth": auth}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    assert se.remote_credentials("127.0.0.1:5001") == ("u", "p")
    assert se.remote_credentials("127.0.0.1:5002") is None
