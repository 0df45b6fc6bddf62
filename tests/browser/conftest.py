"""A real `ember serve` of SmolLM2 (a subprocess with its own $EMBER_HOME, stopped by its process group) and
a headless Debian Chromium driven by selenium through Debian's chromedriver. `bash setup.sh --dev` installs
both; without them these tests skip, unless EMBER_REQUIRE_BROWSER=1 (CI) makes that a failure."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
MODEL = "smollm2-135m"
ARTIFACTS = Path(os.environ.get("EMBER_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "build" / "test-artifacts"))


def _need_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (Python)")
    if missing:
        why = f"browser tests need {', '.join(missing)}: run `bash setup.sh --dev`"
        if os.environ.get("EMBER_REQUIRE_BROWSER") == "1":
            pytest.fail(why)
        pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    end = time.time() + timeout
    while time.time() < end:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class EmberServer:
    """`python -m ember serve` on a free loopback port, in a new process group."""

    def __init__(self, model: Path, home: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "EMBER_HOME": str(home)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ember", "serve", "-m", str(model), "--served-model-name", MODEL,
             "--port", str(self.port), "--kv-cache-memory", "256MiB", *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True).start()  # type: ignore[arg-type]
        try:
            wait_for(lambda: self.proc.poll() is not None or self._up(), 120, "ember serve to start", 0.2)
        except AssertionError:
            self.stop()
            raise
        assert self.proc.poll() is None, "".join(self.log)

    def _up(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


@pytest.fixture(scope="module")
def browser():
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    # the flags keep a sandboxed, offline machine's Chromium from calling out (and from needing a screen)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,860", "--lang=en-US"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()  # also stops chromedriver, which stops Chromium


@pytest.fixture(scope="module")
def server(smollm_gguf, tmp_path_factory):
    s = EmberServer(smollm_gguf, tmp_path_factory.mktemp("ember-home"))
    yield s
    s.stop()


def screenshot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    return path
