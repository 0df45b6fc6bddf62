"""ember on Ray Serve: N engine replicas behind one OpenAI-compatible ingress.

    EmberIngress (ember's own FastAPI app: request models, errors, SSE, /metrics)
        └─ DeploymentHandle ── PrefixAffinityRouter ──▶ EmberEngine × N (ember.load + the async engine)

The ingress turns requests into token ids with the model's `Frontend` (fetched once from a replica: no
weights load there) and streams each choice from a replica chosen by the prefix-affinity router. Ray
Serve restarts a replica whose process dies, health-checks each one (a stuck engine loop fails it) and
autoscales between min and max replicas on ongoing requests.

Use it from the CLI (`ember serve --replicas N`), compose `application(...)` into your own Serve app, or
run it from a Serve config: `serve run ember.server.ray_app:build model=smollm2-135m replicas=2`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from ember.engine.outputs import RequestOutput
from ember.errors import ParameterError
from ember.prompts import Frontend
from ember.sampling_params import SamplingParams
from ember.server.engine_client import LocalEngine, ScoredToken

ENGINE, INGRESS = "EmberEngine", "EmberIngress"
_QUIET = {"log_level": "WARNING", "enable_access_log": False}
# Serve's throughput settings for the replicas (docs/scale-out.md has the measurements): ember's code never
# blocks its event loop (the engine has its own thread), so it runs on the replica's own loop instead of a
# second one (less TTFT at 16 streams), and handle calls go over gRPC (0.83-0.85 of plain `ember serve` at
# 16 streams instead of 0.69-0.74). The proxy's own switch, RAY_SERVE_PROXY_USE_GRPC, is set where Ray starts.
RUNTIME_ENV = {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                            "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0", "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"}}


class ServeArgs(BaseModel):
    """The application's settings: `ember serve` flags, or `args` of a Serve config."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="alias, .gguf file or Hugging Face directory, as every replica sees it")
    served_model_name: str | None = None
    api_key: str | None = None
    replicas: int = Field(1, ge=1, description="replicas to start with (the minimum when autoscaling)")
    max_replicas: int | None = Field(None, ge=1, description="autoscale up to this many on ongoing requests")
    target_ongoing_requests: float = Field(16, gt=0, description="per replica, for the autoscaler")
    replica_cpus: float | None = Field(None, gt=0, description="CPUs per replica (its threads); default: "
                                                                  "this machine's CPUs / replicas")
    replica_gpus: float = Field(0, ge=0)
    load: dict[str, Any] = Field(default_factory=dict, description="ember.load() keywords for each replica")
    imbalance: int = Field(4, ge=0, description="routing: requests a prefix's replica may run beyond the "
                                                "least-loaded one before a request goes elsewhere")
    stuck_after_s: float = Field(120, gt=0, description="health: a replica whose engine step runs longer fails")
    admit_timeout_s: float = Field(120, gt=0, description="a request no replica admits by then gets a 503")
    stream_interval: int = Field(1, ge=1, description="tokens per streamed message after the first: more "
                                                      "means fewer messages through Ray, in bigger steps")
    ui: bool = Field(True, description="the chat page at /")

    @model_validator(mode="after")
    def _scale(self) -> ServeArgs:
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"max_replicas {self.max_replicas} is below replicas {self.replicas}")
        return self

    def cpus(self) -> float:
        return self.replica_cpus or max(1, (os.cpu_count() or 1) // self.replicas)

    def name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return os.path.splitext(os.path.basename(self.model))[0] if self.model.endswith(".gguf") else self.model


class EngineReplica:
    """One engine: the model loaded in this replica's process, running its own batches and prefix cache."""

    def __init__(self, model: str, load: dict[str, Any], threads: int, stuck_after_s: float,
                 stream_interval: int = 1) -> None:
        import ember

        self.stuck_after_s, self.stream_interval = stuck_after_s, stream_interval

        def load_here() -> ember.LLM:
            # on the engine's thread: its OpenMP pool is the only one, and sized to this replica's CPUs
            # (a thread's OpenMP size is its own: set where the kernels will run)
            torch.set_num_threads(threads)
            return ember.load(model, **load)

        self.engine = LocalEngine(load_here, replica=serve.get_replica_context().replica_id.unique_id)
        self.llm = self.engine.llm

    def frontend(self) -> Frontend:
        return self.llm.frontend()

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[str | RequestOutput]:
        """First the replica's id (the request is admitted), then its RequestOutputs. A cancelled call
        (client gone, replica-side abort) aborts the request in the engine."""
        rid = await self.engine.add(prompt_token_ids, params, request_id)
        yield self.engine.replica
        held: RequestOutput | None = None
        first = True
        async for out in self.engine.stream(rid):
            if out.finished:
                self.engine.count(out)
            held = out if held is None else held.joined(out)
            # the first token at once (TTFT); then every stream_interval tokens: fewer messages through Ray
            if first or out.finished or len(held.token_ids) >= self.stream_interval:
                first = False
                yield held
                held = None

    async def score(self, prompt_token_ids: list[int], top_n: int) -> list[ScoredToken]:
        return await self.engine.score(prompt_token_ids, top_n)

    def record_routing_stats(self) -> dict[str, Any]:
        """Polled by Ray Serve; the ingress's router shows it in /metrics."""
        return self.engine.stats()[0].as_dict()

    def check_health(self) -> None:
        self.engine.check_health(self.stuck_after_s)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


@serve.ingress()
class Ingress:
    """ember's OpenAI app, its engine client being the handle to the engine replicas."""

    def __init__(self, engine: DeploymentHandle, model_name: str, api_key: str | None, admit_timeout_s: float,
                 ui: bool = True) -> None:
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.admit_timeout_s, self.ui = admit_timeout_s, ui

    async def __serve_build_asgi_app__(self) -> Any:
        from ember.server.app import build_app
        from ember.server.ray_client import RayEngine

        frontend = await self.engine.frontend.remote()
        client = RayEngine(self.engine, router_key(serve.get_replica_context().app_name), self.admit_timeout_s)
        return build_app(frontend, client, self.model_name, self.api_key, self.ui)


def router_key(app_name: str) -> str:
    return f"{app_name}/{ENGINE}"


def application(args: ServeArgs) -> serve.Application:
    """The two deployments, bound: run it with serve.run(...) or compose it into your own Serve app."""
    from ember.config import EngineConfig

    scale: dict[str, Any] = {"num_replicas": args.replicas}
    if args.max_replicas is not None and args.max_replicas > args.replicas:
        scale = {"autoscaling_config": {"min_replicas": args.replicas, "max_replicas": args.max_replicas,
                                        "target_ongoing_requests": args.target_ongoing_requests}}
    cpus = args.cpus()
    engine = serve.deployment(
        name=ENGINE, **scale,
        max_ongoing_requests=2 * int(args.load.get("max_num_seqs", 64)),  # more wait in ember's own queue
        ray_actor_options={"num_cpus": cpus, "num_gpus": args.replica_gpus, "runtime_env": RUNTIME_ENV},
        request_router_config=RequestRouterConfig(
            request_router_class="ember.server.ray_router.PrefixAffinityRouter",
            request_router_kwargs={"block_size": EngineConfig.block_size, "imbalance": args.imbalance},
            request_routing_stats_period_s=1.0, request_routing_stats_timeout_s=10.0),
        health_check_period_s=5.0, health_check_timeout_s=30.0, logging_config=_QUIET,
    )(EngineReplica).bind(args.model, args.load, max(1, int(cpus)), args.stuck_after_s, args.stream_interval)
    ingress = serve.deployment(name=INGRESS, num_replicas=1, max_ongoing_requests=10_000,
                               ray_actor_options={"num_cpus": 0, "runtime_env": RUNTIME_ENV},
                               logging_config=_QUIET)(Ingress)
    return ingress.bind(engine, args.name(), args.api_key, args.admit_timeout_s, args.ui)


def build(args: dict[str, Any]) -> serve.Application:
    """Application builder for Serve configs and `serve run ember.server.ray_app:build key=value ...`."""
    try:
        return application(ServeArgs(**args))
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "args"
        raise ParameterError(f"ember Serve application, {where}: {first['msg']}") from None
