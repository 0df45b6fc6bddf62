"""`ember serve --replicas N`: start (or join) Ray, run ember's Serve application, stop it on Ctrl-C."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from ember.errors import EmberError

if TYPE_CHECKING:
    from ember.server.ray_app import ServeArgs

APP = "ember"


def import_ray() -> Any:
    try:
        import ray
        from ray import serve  # noqa: F401 - ray[serve], not only ray
    except ImportError:
        raise EmberError("--replicas and --ray-address run on Ray Serve, which is not installed: "
                         "pip install 'ember[ray]'") from None
    return ray


def serve_on_ray(model: str, name: str, api_key: str | None, load: dict[str, Any], host: str, port: int,
                 replicas: int, max_replicas: int | None, replica_cpus: float | None, replica_gpus: float,
                 ray_address: str | None, stream_interval: int = 1, ui: bool = True) -> None:
    """Check what can be checked here (Ray installed, the flags, the model's path), then serve."""
    import_ray()
    from ember.hub import resolve_model
    from ember.server.ray_app import ServeArgs

    if max_replicas is not None and max_replicas < replicas:
        raise EmberError(f"--max-replicas {max_replicas} is below --replicas {replicas}")
    if replica_cpus is not None and replica_cpus <= 0:
        raise EmberError(f"--replica-cpus {replica_cpus:g}: give a positive number")
    if replica_gpus < 0:
        raise EmberError(f"--replica-gpus {replica_gpus:g}: give 0 or more")
    # pulled here, once, with a progress bar; replicas on this machine find it in the cache
    path = str(resolve_model(model, quiet=False))
    model_arg = model if ray_address is not None and not os.path.exists(model) else path
    args = ServeArgs(model=model_arg, served_model_name=name, api_key=api_key, replicas=replicas,
                     max_replicas=max_replicas, replica_cpus=replica_cpus, replica_gpus=replica_gpus,
                     stream_interval=stream_interval, ui=ui, load={k: v for k, v in load.items() if v is not None})
    serve_replicas(args, host, port, ray_address)


def _logs_dir() -> str:
    try:
        from ray._private.worker import global_worker  # the session's own directory, when Ray says it

        return os.path.join(global_worker.node.get_session_dir_path(), "logs")
    except (ImportError, AttributeError):
        return "/tmp/ray/session_latest/logs"


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the app as Ctrl-C does


def serve_replicas(args: ServeArgs, host: str, port: int, ray_address: str | None) -> None:
    """Run until Ctrl-C or SIGTERM. A local Ray instance is started (and stopped) here; with ray_address
    the app joins that cluster and only the app is deleted at the end."""
    ray = import_ray()
    from ray import serve

    from ember.server.ray_app import application

    err = sys.stderr
    need = args.cpus() * (args.max_replicas or args.replicas)
    if ray_address is None:
        # Serve's proxy and handles talk gRPC in the local instance (inherited by every process Ray starts)
        os.environ.setdefault("RAY_SERVE_PROXY_USE_GRPC", "1")
        os.environ.setdefault("RAY_SERVE_USE_GRPC_BY_DEFAULT", "1")
        have = os.cpu_count() or 1
        if need > have:
            print(f"[ember] warning: {args.replicas} replicas x {args.cpus():g} CPUs oversubscribe this machine's "
                  f"{have} CPUs", file=err)
        ray.init(num_cpus=max(have, int(need + 0.999)), include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
    else:
        try:
            ray.init(address=ray_address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError) as e:  # Ray's AuthenticationError is a RuntimeError too
            last = [ln for ln in str(e).splitlines() if ln.strip()][-1:] or [type(e).__name__]
            raise EmberError(f"cannot join the Ray cluster at {ray_address} ({last[0][:200]}). Is it up (`ray "
                             "start --head`)? `--ray-address auto` finds one on this machine; a cluster with "
                             "token authentication also needs RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN "
                             "or ~/.ray/auth_token)") from None
    # replicas' logs stay in Ray's files: Serve logs every client disconnect as a failed request with a traceback
    print(f"[ember] Ray logs (replicas, Serve): {_logs_dir()}", file=err)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # ember prints its own progress lines
    signal.signal(signal.SIGTERM, _stop)
    t0 = time.perf_counter()
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
        scale = f"{args.replicas}..{args.max_replicas}" if args.max_replicas else str(args.replicas)
        print(f"[ember] starting {scale} replica(s) of '{args.name()}' on Ray Serve "
              f"({args.cpus():g} CPUs{f', {args.replica_gpus:g} GPUs' if args.replica_gpus else ''} each)", file=err)
        try:
            serve.run(application(args), name=APP, route_prefix="/", blocking=False)
        except RuntimeError as e:  # a replica failed to start: say why in one line
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            raise EmberError(f"the replicas did not start: {lines[-1] if lines else e}") from None
        from ember.cli.main import base_url

        where = base_url(host, port)
        print(f"[ember] serving '{args.name()}' at {where}/v1 (OpenAI API) on Ray Serve, "
              f"ready in {time.perf_counter() - t0:.1f}s" + (", API key required" if args.api_key else "")
              + (f"; chat page at {where}/" if args.ui else ""), file=err)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[ember] stopping", file=err)
    finally:
        try:
            if ray_address is None:
                serve.shutdown()
            else:
                serve.delete(APP)
        finally:
            ray.shutdown()
