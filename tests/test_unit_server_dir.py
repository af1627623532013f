"""Unit tests of an instance's server directory (``SnapshotManager.make_server_dir``): what a
reset in place rests on. The engine (root) makes it in a directory the server user owns, from
data the server user wrote: it never follows a link, never copies what is not a plain file,
and keeps the postmaster's own files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import sqlrs_engine as se

pytestmark = pytest.mark.unit

KEY = "0123456789abcdef0123456789abcdef"


def manager(tmp_path: Path) -> tuple[se.SnapshotManager, Path, Path]:
    """A manager whose runtime ``KEY`` has the data directory ``data`` (a plain directory
    here, the overlay in the engine) and the server directory ``server``."""
    expose = tmp_path / "expose"
    (expose / KEY / "data").mkdir(parents=True)
    snapshots = se.SnapshotManager("copy", str(expose), str(tmp_path))
    return snapshots, expose / KEY / "data", expose / KEY / se.SERVER_DIR_NAME


def owner() -> tuple[int, int]:
    return os.geteuid(), os.getegid()


def test_directories_are_linked_and_files_copied(tmp_path: Path) -> None:
    snapshots, data, server = manager(tmp_path)
    (data / "base").mkdir()
    (data / "global").mkdir()
    (data / "PG_VERSION").write_text("15\n")
    (data / "postgresql.conf").write_text("port = 5432\n")
    (data / "postmaster.pid").write_text("a stale lock file\n")
    snapshots.make_server_dir(KEY, owner())
    assert stat.S_IMODE(server.stat().st_mode) == 0o700
    assert sorted(p.name for p in server.iterdir()) == ["PG_VERSION", "base", "global",
                                                         "postgresql.conf"]
    assert os.readlink(server / "base") == str(data / "base")
    assert not (server / "PG_VERSION").is_symlink()
    assert (server / "PG_VERSION").read_text() == "15\n"
    assert stat.S_IMODE((server / "PG_VERSION").stat().st_mode) == 0o600


def test_a_remake_keeps_the_postmasters_files_and_replaces_the_rest(tmp_path: Path) -> None:
    snapshots, data, server = manager(tmp_path)
    (data / "base").mkdir()
    (data / "postgresql.auto.conf").write_text("work_mem = '4MB'\n")
    snapshots.make_server_dir(KEY, owner())
    (server / "postmaster.pid").write_text("1234\n")
    (server / "postgresql.auto.conf").write_text("work_mem = '77MB'\n")  # ALTER SYSTEM
    (server / "backup_label.old").write_text("START WAL LOCATION\n")
    (server / "junk" / "deeper").mkdir(parents=True)
    (server / "junk" / "file").write_text("x")
    os.mkfifo(server / "junk" / "deeper" / "fifo")  # removed, never opened
    os.mkfifo(server / "fifo")
    base_link = os.lstat(server / "base")
    snapshots.make_server_dir(KEY, owner())
    assert sorted(p.name for p in server.iterdir()) == ["base", "postgresql.auto.conf",
                                                         "postmaster.pid"]
    assert (server / "postmaster.pid").read_text() == "1234\n"
    assert (server / "postgresql.auto.conf").read_text() == "work_mem = '4MB'\n"
    assert os.lstat(server / "base").st_ino == base_link.st_ino  # what is right stays
    assert [p.name for p in server.parent.iterdir() if p.name.startswith(".")] == []
    assert snapshots.server_files(KEY, ["postgresql.auto.conf", "nothing"]) == {
        "postgresql.auto.conf": b"work_mem = '4MB'\n", "nothing": None}


def test_links_and_special_files_are_never_followed(tmp_path: Path) -> None:
    """A symlink or FIFO the server user planted in the data is left out (not its target's
    bytes copied, no blocking read); one planted in the server directory is replaced, its
    target untouched."""
    snapshots, data, server = manager(tmp_path)
    secret = tmp_path / "secret"
    secret.write_text("root's secret\n")
    secret.chmod(0o600)
    (data / "postgresql.conf").symlink_to(secret)
    (data / "pg_ident.conf").symlink_to(tmp_path)
    os.mkfifo(data / "fifo")
    (data / "PG_VERSION").write_text("15\n")
    server.mkdir(mode=0o700)
    (server / "PG_VERSION").symlink_to(secret)
    snapshots.make_server_dir(KEY, owner())
    assert sorted(p.name for p in server.iterdir()) == ["PG_VERSION"]
    assert not (server / "PG_VERSION").is_symlink()
    assert (server / "PG_VERSION").read_text() == "15\n"
    assert secret.read_text() == "root's secret\n"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_files_too_big_to_be_configuration_are_refused(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Top-level files over ``SMALL_FILE_LIMIT`` bytes in all are refused (not copied to a
    tmpfs, not held in memory), and no half-made server directory is left."""
    snapshots, data, server = manager(tmp_path)
    monkeypatch.setattr(se, "SMALL_FILE_LIMIT", 8)
    (data / "postgresql.conf").write_text("x" * 5)
    (data / "pg_ident.conf").write_text("y" * 5)
    with pytest.raises(OSError, match="over 8 bytes"):
        snapshots.make_server_dir(KEY, owner())
    assert sorted(p.name for p in server.parent.iterdir()) == ["data"]


def test_an_untrusted_tree_is_removed_without_following(tmp_path: Path) -> None:
    """``remove_untrusted`` removes a deep tree with FIFOs and links without opening them or
    following the links (their targets stay)."""
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "file").write_text("kept")
    top = tmp_path / "top"
    deep = top.joinpath(*["d"] * 300)
    deep.mkdir(parents=True)
    os.mkfifo(deep / "fifo")
    (deep / "link").symlink_to(keep)
    (top / "link").symlink_to(keep / "file")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        se.remove_untrusted(fd, "top")
        se.remove_untrusted(fd, "nothing")  # gone already: nothing to do
    finally:
        os.close(fd)
    assert not top.exists()
    assert (keep / "file").read_text() == "kept"
