"""Build dist/sqlrs-engine.pyz: the engine and its libraries in one file.

Pure-Python libraries are imported straight from the archive. Packages with compiled parts
(psycopg2-binary's extension and bundled libpq) cannot load from a zip; the archive carries them
under ``_native/`` and unpacks them on first import into a per-content cache directory
(``$SQLRS_ENGINE_CACHE`` or ``~/.cache/sqlrs-engine/native-<hash>``), published with a rename so
two engines starting at once never see a half-written copy. The build is reproducible: entries
are sorted and carry fixed timestamps and modes, so the same inputs give the same bytes.

It also builds dist/sqlrs-engine: one file that is both a native executable and the zipapp. A
small launcher (native/launcher.c, compiled with the system C compiler: $CC, cc, gcc or clang)
comes first and the archive is written after it, so its offsets are right for zipfile, zipimport
and unzip alike. The launcher execs ``python3 <itself> args...``. Without a compiler only the .pyz
is built (with a warning) unless ``--native`` demands the executable.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import marshal
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
FIXED_TIME = (1980, 1, 1, 0, 0, 0)
DEFAULT_REQUIREMENTS = (
    "docker==7.1.0",
    "requests==2.32.3",
    "urllib3==2.2.3",
    "idna==3.10",
    "certifi==2024.8.30",
    "charset-normalizer==3.4.0",
    "psycopg2-binary==2.9.10",
    "typing-extensions==4.12.2",
)
DROP_FROM_DIST_INFO = ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")
NATIVE_SUFFIXES = (".so", ".pyd", ".dylib")
LAUNCHER_SOURCE = ROOT / "native" / "launcher.c"
COMPILERS = ("cc", "gcc", "clang")
# No paths, timestamps or debug info in the output: the same compiler gives the same bytes.
LAUNCHER_FLAGS = ("-std=c11", "-Wall", "-Wextra", "-O2", "-s")
SOURCE_DATE_EPOCH = "315532800"  # FIXED_TIME, 1980-01-01 UTC

BOOTSTRAP = '''"""sqlrs-engine zipapp bootstrap: vendored imports, native parts unpacked."""
import hashlib
import importlib.abc
import importlib.machinery
import os
import sys
import zipfile

ARCHIVE = os.path.dirname(os.path.abspath(__file__))
NATIVE_HASH = "{native_hash}"
NATIVE_TOP_LEVEL = {native_top_level!r}
NATIVE_FILES = {native_files!r}


def _cache_root():
    explicit = os.environ.get("SQLRS_ENGINE_CACHE")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sqlrs-engine")


def _verified(target):
    try:
        with open(os.path.join(target, ".complete"), encoding="utf-8") as handle:
            if handle.read().strip() != NATIVE_HASH:
                return False
        return all(os.path.getsize(os.path.join(target, name)) == size
                   for name, size in NATIVE_FILES.items())
    except OSError:
        return False


def _unpack():
    root = _cache_root()
    target = os.path.join(root, "native-" + NATIVE_HASH[:24])
    if _verified(target):
        return target
    os.makedirs(root, mode=0o700, exist_ok=True)
    staging = f"{{target}}.tmp-{{os.getpid()}}"
    digest = hashlib.sha256()
    with zipfile.ZipFile(ARCHIVE) as archive:
        for name in sorted(NATIVE_FILES):
            data = archive.read("_native/" + name)
            digest.update(name.encode() + b"\\0" + data)
            path = os.path.join(staging, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as handle:
                handle.write(data)
            os.chmod(path, 0o755 if name.endswith((".so", ".dylib")) else 0o644)
    if digest.hexdigest() != NATIVE_HASH:
        raise ImportError("sqlrs-engine archive is corrupt: native payload hash mismatch")
    with open(os.path.join(staging, ".complete"), "w", encoding="utf-8") as handle:
        handle.write(NATIVE_HASH)
    try:
        os.rename(staging, target)
    except OSError:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        if not _verified(target):
            raise
    return target


class _NativeFinder(importlib.abc.MetaPathFinder):
    """Unpacks the native payload the first time one of its packages is imported."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] not in NATIVE_TOP_LEVEL:
            return None
        directory = _unpack()
        sys.meta_path.remove(self)
        sys.path.insert(0, directory)
        return importlib.machinery.PathFinder.find_spec(fullname, [directory])


sys.path.insert(0, os.path.join(ARCHIVE, "vendor"))
if NATIVE_TOP_LEVEL:
    sys.meta_path.insert(0, _NativeFinder())

import sqlrs_engine  # noqa: E402

sys.exit(sqlrs_engine.main())
'''


def install_libraries(target: Path, requirements: list[str], platform: str | None,
                      python_version: str | None) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--no-compile", "--no-deps", "--only-binary=:all:", "--target", str(target)]
    if platform:
        cmd += ["--platform", platform, "--implementation", "cp"]
    if python_version:
        cmd += ["--python-version", python_version]
    subprocess.run([*cmd, *requirements], check=True)


def tidy(vendor: Path) -> None:
    """Drop what is not needed at run time or differs between builds."""
    for path in sorted(vendor.rglob("*"), reverse=True):
        if path.name == "__pycache__" or (path.parent == vendor and path.name == "bin"):
            shutil.rmtree(path, ignore_errors=True)
        elif path.suffix == ".pyc" or (path.parent.name.endswith(".dist-info")
                                       and path.name in DROP_FROM_DIST_INFO):
            path.unlink()


def native_top_levels(vendor: Path) -> list[str]:
    """Top-level entries (packages and their ``.libs`` siblings) holding compiled code."""
    natives = set()
    for path in vendor.rglob("*"):
        if path.is_file() and (path.suffix in NATIVE_SUFFIXES or ".so." in path.name):
            natives.add(path.relative_to(vendor).parts[0])
    packages = {name.split("_binary")[0].split(".")[0] for name in natives}
    return sorted(natives | {p for p in packages if (vendor / p).is_dir()})


def hash_pyc(source: bytes, name: str) -> bytes:
    """An unchecked hash-based .pyc (PEP 552): zipimport loads it without recompiling."""
    code = compile(source, name, "exec", dont_inherit=True)
    return (importlib.util.MAGIC_NUMBER + (0b01).to_bytes(4, "little")
            + importlib.util.source_hash(source) + marshal.dumps(code))


def add_bytecode(entries: dict[str, bytes]) -> None:
    for name in [n for n in entries if n.endswith(".py") and n != "__main__.py"]:
        try:
            entries[name + "c"] = hash_pyc(entries[name], f"sqlrs-engine.pyz/{name}")
        except SyntaxError:
            continue


def archive_entries(staging: Path, vendor: Path, natives: list[str]) -> dict[str, bytes]:
    entries: dict[str, bytes] = {"sqlrs_engine.py": (ROOT / "sqlrs_engine.py").read_bytes()}
    native_files: dict[str, int] = {}
    digest = hashlib.sha256()
    for path in sorted(p for p in vendor.rglob("*") if p.is_file()):
        rel = path.relative_to(vendor).as_posix()
        data = path.read_bytes()
        if rel.split("/")[0] in natives:
            entries[f"_native/{rel}"] = data
            native_files[rel] = len(data)
            digest.update(rel.encode() + b"\0" + data)
        else:
            entries[f"vendor/{rel}"] = data
    top_level = sorted({name.split("/")[0] for name in native_files if "/" in name})
    entries["__main__.py"] = BOOTSTRAP.format(
        native_hash=digest.hexdigest() if native_files else "",
        native_top_level=tuple(name for name in top_level if not name.endswith(".libs")),
        native_files=dict(sorted(native_files.items())),
    ).encode()
    return entries


def write_archive(output: Path, entries: dict[str, bytes], prefix: bytes) -> None:
    """Write ``prefix`` (a shebang line or the launcher), then the archive right after it.

    zipfile records offsets from the start of the file, so the result is a valid zip as is.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(prefix)
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name in sorted(entries):
                info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
                info.external_attr = 0o644 << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, entries[name], compresslevel=9)
    os.chmod(tmp, 0o755)
    os.replace(tmp, output)


class LauncherError(Exception):
    """The native launcher could not be built."""


def find_compiler() -> list[str]:
    """The C compiler command: ``$CC`` (it may carry flags) or the first of COMPILERS on PATH."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    for name in COMPILERS:
        found = shutil.which(name)
        if found:
            return [found]
    raise LauncherError(f"no C compiler found (set CC or install one of {', '.join(COMPILERS)})")


def preferred_python(python_version: str | None) -> str | None:
    """``python3.N`` for the Python the archive's compiled parts target (pip's 3.N or 3N)."""
    version = python_version or f"{sys.version_info[0]}.{sys.version_info[1]}"
    match = re.fullmatch(r"3\.?(\d{1,2})", version)
    return f"python3.{match.group(1)}" if match else None


def native_target_problem(wheel_platform: str | None) -> str | None:
    """Why the host compiler cannot build for the target, if it cannot."""
    if sys.platform != "linux":
        return f"the native launcher supports Linux only (this is {sys.platform})"
    machine = platform.machine()
    if wheel_platform and not os.environ.get("CC") and not (
            wheel_platform.startswith(("linux", "manylinux", "musllinux"))
            and wheel_platform.endswith(machine)):
        return (f"--platform {wheel_platform} is not this {machine} Linux host "
                "(set CC to cross-build)")
    return None


def compile_launcher(compiler: list[str], python_name: str | None) -> bytes:
    """Compile native/launcher.c in a scratch directory under a fixed name; return the binary."""
    with tempfile.TemporaryDirectory(prefix="sqlrs-launcher-") as tmp:
        shutil.copyfile(LAUNCHER_SOURCE, Path(tmp) / "launcher.c")
        define = [f'-DPREFERRED_PYTHON="{python_name}"'] if python_name else []
        cmd = [*compiler, *LAUNCHER_FLAGS, f"-ffile-prefix-map={tmp}=.", *define,
               "-o", "launcher", "launcher.c"]
        env = {**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH, "LC_ALL": "C"}
        try:
            result = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True,
                                    check=False)
        except OSError as exc:
            raise LauncherError(f"cannot run {compiler[0]}: {exc}") from exc
        if result.returncode != 0:
            raise LauncherError(f"{shlex.join(cmd)} failed:\n{result.stderr.strip()}")
        if result.stderr.strip():
            print(result.stderr.strip(), file=sys.stderr)
        return (Path(tmp) / "launcher").read_bytes()


def build_launcher(wheel_platform: str | None, python_version: str | None) -> bytes:
    problem = native_target_problem(wheel_platform)
    if problem:
        raise LauncherError(problem)
    return compile_launcher(find_compiler(), preferred_python(python_version))


def report(path: Path) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    print(f"{path} {path.stat().st_size} bytes sha256={digest}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "dist" / "sqlrs-engine.pyz")
    parser.add_argument("--native-output", type=Path,
                        help="the native executable; default: --output without its suffix")
    native = parser.add_mutually_exclusive_group()
    native.add_argument("--native", action="store_true",
                        help="fail unless the native executable is built")
    native.add_argument("--no-native", action="store_true", help="build only the .pyz")
    parser.add_argument("--platform", help="target wheel platform, e.g. manylinux2014_x86_64")
    parser.add_argument("--python-version", help="target Python, e.g. 3.11")
    parser.add_argument("--interpreter", default="/usr/bin/env python3")
    parser.add_argument("--requirement", action="append", dest="requirements",
                        help="pinned requirement (repeatable); default: the tested pins")
    parser.add_argument("--no-vendor", action="store_true",
                        help="only the engine module (the libraries must be installed)")
    parser.add_argument("--no-bytecode", action="store_true",
                        help="leave out .pyc files (always left out for another Python)")
    args = parser.parse_args()
    native_output: Path = args.native_output or args.output.with_suffix("")
    if native_output.resolve() == args.output.resolve():
        parser.error("the native executable needs its own path: pass --native-output")
    with tempfile.TemporaryDirectory(prefix="sqlrs-zipapp-") as tmp:
        staging = Path(tmp)
        vendor = staging / "vendor"
        vendor.mkdir()
        if not args.no_vendor:
            install_libraries(vendor, args.requirements or list(DEFAULT_REQUIREMENTS),
                              args.platform, args.python_version)
            tidy(vendor)
        entries = archive_entries(staging, vendor, native_top_levels(vendor))
        same_python = args.python_version in (None, f"{sys.version_info[0]}.{sys.version_info[1]}")
        if same_python and not args.no_bytecode:
            add_bytecode(entries)
        write_archive(args.output, entries, f"#!{args.interpreter}\n".encode())
        report(args.output)
        if args.no_native:
            return 0
        try:
            launcher = build_launcher(args.platform, args.python_version)
        except LauncherError as exc:
            stale = native_output.is_file()
            native_output.unlink(missing_ok=True)
            print(f"{'error' if args.native else 'warning'}: {native_output} was not built: "
                  f"{exc}{' (removed the stale copy)' if stale else ''}", file=sys.stderr)
            return 1 if args.native else 0
        write_archive(native_output, entries, launcher)
    report(native_output)
    print(f"  native launcher: {len(launcher)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
