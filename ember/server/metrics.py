"""Counters for GET /metrics, in Prometheus' text format."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ember.engine.async_engine import AsyncEngine


@dataclass
class Metrics:
    requests: Counter = field(default_factory=Counter)  # by (endpoint, outcome)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def render(self, aeng: AsyncEngine) -> str:
        kv = aeng.engine.kv
        lines = ["# HELP ember_requests_total Requests answered, by endpoint and outcome.",
                 "# TYPE ember_requests_total counter"]
        for (endpoint, outcome), n in sorted(self.requests.items()):
            lines.append(f'ember_requests_total{{endpoint="{endpoint}",outcome="{outcome}"}} {n}')
        gauges = [
            ("ember_prompt_tokens_total", "counter", "Prompt tokens of finished requests.", self.prompt_tokens),
            ("ember_completion_tokens_total", "counter", "Generated tokens of finished requests.",
             self.completion_tokens),
            ("ember_cached_prompt_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
             self.cached_tokens),
            ("ember_requests_waiting", "gauge", "Requests queued for the engine.", aeng.num_waiting),
            ("ember_requests_running", "gauge", "Requests the engine is running.", aeng.num_running),
            ("ember_kv_blocks_free", "gauge", "Free KV-cache blocks (cached prefixes included).", kv.num_free_blocks),
            ("ember_kv_blocks_used", "gauge", "KV-cache blocks held by requests.", kv.num_blocks - kv.num_free_blocks),
        ]
        for name, kind, text, value in gauges:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(lines) + "\n"
