"""A real `ember serve` of SmolLM2-135M (`served`, `client`), shared by the test modules that need real weights.
test_server.py defines its own `served` / `client` over a tiny random model, which take precedence there."""

from __future__ import annotations

import openai
import pytest

import ember
from tests.server.test_server import Served


@pytest.fixture(scope="session")
def served(smollm_gguf):
    s = Served(ember.load(smollm_gguf), name="smollm2-135m")
    yield s
    s.stop()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", timeout=120)
