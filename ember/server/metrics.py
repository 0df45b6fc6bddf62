"""Counters for GET /metrics, in Prometheus' text format.

The unlabelled series are the server's totals. Behind Ray Serve every engine replica also gets its own
series, labelled replica="<id>" (its gauges now and its counters since it started), and ember_replicas
counts the replicas up.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ember.server.engine_client import EngineStats

_GAUGES = [  # (metric, EngineStats field, help)
    ("ember_requests_waiting", "waiting", "Requests queued for the engine."),
    ("ember_requests_running", "running", "Requests the engine is running."),
    ("ember_kv_blocks_free", "kv_blocks_free", "Free KV-cache blocks (cached prefixes included)."),
    ("ember_kv_blocks_used", None, "KV-cache blocks held by requests."),
]
_REPLICA_COUNTERS = [
    ("ember_replica_requests_total", "requests", "Requests an engine replica has finished."),
    ("ember_replica_prompt_tokens_total", "prompt_tokens", "Prompt tokens of the replica's finished requests."),
    ("ember_replica_completion_tokens_total", "completion_tokens", "Tokens the replica generated."),
    ("ember_replica_cached_prompt_tokens_total", "cached_tokens", "Prompt tokens the replica's prefix cache served."),
]


def _value(s: EngineStats, attr: str | None) -> int:
    return s.kv_blocks_total - s.kv_blocks_free if attr is None else getattr(s, attr)


@dataclass
class Metrics:
    requests: Counter = field(default_factory=Counter)  # by (endpoint, outcome)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def render(self, engines: list[EngineStats]) -> str:
        lines = ["# HELP ember_requests_total Requests answered, by endpoint and outcome.",
                 "# TYPE ember_requests_total counter"]
        for (endpoint, outcome), n in sorted(self.requests.items()):
            lines.append(f'ember_requests_total{{endpoint="{endpoint}",outcome="{outcome}"}} {n}')
        for name, text, value in [
            ("ember_prompt_tokens_total", "Prompt tokens of finished requests.", self.prompt_tokens),
            ("ember_completion_tokens_total", "Generated tokens of finished requests.", self.completion_tokens),
            ("ember_cached_prompt_tokens_total", "Prompt tokens served from the prefix cache.", self.cached_tokens),
        ]:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} counter", f"{name} {value}"]
        replicas = sorted((s for s in engines if s.replica is not None), key=lambda s: str(s.replica))
        for name, attr, text in _GAUGES:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name} {sum(_value(s, attr) for s in engines)}"]
            lines += [f'{name}{{replica="{s.replica}"}} {_value(s, attr)}' for s in replicas]
        if not replicas:
            return "\n".join(lines) + "\n"
        lines += ["# HELP ember_replicas Engine replicas up.", "# TYPE ember_replicas gauge",
                  f"ember_replicas {len(replicas)}",
                  "# HELP ember_replica_info An engine replica's process (1 while it is up).",
                  "# TYPE ember_replica_info gauge"]
        lines += [f'ember_replica_info{{replica="{s.replica}",pid="{s.pid}"}} 1' for s in replicas]
        for name, attr, text in _REPLICA_COUNTERS:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} counter"]
            lines += [f'{name}{{replica="{s.replica}"}} {getattr(s, attr)}' for s in replicas]
        return "\n".join(lines) + "\n"
