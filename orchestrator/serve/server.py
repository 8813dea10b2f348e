"""`imitate-orch serve`: deploy the Serve app for a resolved target (target.py) and run until
Ctrl-C."""
from __future__ import annotations

import logging
import os
import signal
import socket
import time

from .target import ServeSetupError, ServeTarget

log = logging.getLogger("imitate_orch")


def serve_application(target: ServeTarget):
    """The bound Serve application (deployment options from the job's serve section)."""
    from .app import Translator

    s = target.spec.serve
    return Translator.options(
        num_replicas=s.replicas,
        # One CPU thread per replica (Ray sets OMP_NUM_THREADS from num_cpus): scale with replicas.
        ray_actor_options={"num_cpus": 1, "num_gpus": s.gpus_per_replica},
        # Serve caps a batch at max_ongoing_requests. By default room for one batch decoding and
        # the next filling; at least 32, so that requests wait in the replica's queue rather than
        # in Serve's router, which backs off and retries while every replica is full.
        max_ongoing_requests=s.max_ongoing_requests or max(2 * s.max_batch_size, 32),
        # Past that many requests waiting in Serve's proxy for a free slot, answer 503 with
        # Retry-After at once: under overload a queue without end only makes every answer late.
        max_queued_requests=s.max_queued_requests,
        backpressure_config={"status_code": 503, "retry_after_s": s.retry_after_s},
    ).bind(target.source, s.model_dump(), target.spec.eval.model_dump())


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as e:
            raise ServeSetupError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


DIRECT_INGRESS = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
# Replicas take the lowest free port from serve.direct_port on; a replaced replica's port is
# held back for a while, so its successor takes the next one: room for that.
DIRECT_PORT_SPAN = 100


def enable_direct_ingress(direct_port: int | None, joining: bool) -> None:
    """Ray Serve's direct ingress (serve.direct_port) for the Ray cluster this process starts:
    Serve's processes read it from their environment when they start."""
    if direct_port is None:
        return
    if joining and os.environ.get(DIRECT_INGRESS) != "1":
        raise ServeSetupError(f"serve.direct_port: a Ray cluster this command joins must have been started "
                              f"with {DIRECT_INGRESS}=1 and RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT={direct_port} "
                              f"in its environment (set them here too); or leave out --address and ray.address")
    os.environ[DIRECT_INGRESS] = "1"
    os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(direct_port)
    os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(min(65536, direct_port + DIRECT_PORT_SPAN))
    # A stopping replica keeps answering this long (Ray's default 30 s), for a load balancer in
    # front of the replicas to notice; with none, Ctrl-C would wait for nothing.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")


def replica_urls(host: str, proxy_port: int) -> list[str]:
    """Base URLs of the replicas answering HTTP themselves (serve.direct_port), from Serve's
    controller; empty without direct ingress (then its targets are the proxies)."""
    import ray
    from ray.serve.context import _get_global_client

    from .app import APP_NAME

    groups = ray.get(_get_global_client()._controller.get_target_groups.remote(APP_NAME))
    host = f"[{host}]" if ":" in host else host
    return sorted(f"http://{host}:{t.port}" for g in groups if str(g.protocol.value) == "HTTP"
                  and g.app_name == APP_NAME for t in g.targets if t.port != proxy_port)


def start(target: ServeTarget) -> str:
    """Start Serve's HTTP proxy on serve.host:serve.port (unless Serve already runs there on this
    cluster) and deploy; returns the base URL once every replica is up. Ray must be initialized."""
    from ray import serve
    from ray.serve.context import _get_global_client

    from .app import APP_NAME

    s = target.spec.serve
    running = _get_global_client(raise_if_no_controller_running=False)
    # Serve's HTTP options are fixed while it runs (serve.start would only warn): refuse rather
    # than print a URL nothing listens on.
    if running is not None and (running.http_config.host, running.http_config.port) != (s.host, s.port):
        actual = running.http_config
        raise ServeSetupError(f"Serve already runs on this Ray cluster at {actual.host}:{actual.port}; "
                              f"use that host and port, or stop it (`serve shutdown`)")
    if running is not None and running.http_config.request_timeout_s != s.request_timeout_s:
        log.warning("Serve already runs with request_timeout_s=%s: serve.request_timeout_s=%s does not apply",
                    running.http_config.request_timeout_s, s.request_timeout_s)
    serve.start(http_options={"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s})
    serve.run(serve_application(target), name=APP_NAME, route_prefix="/")
    host = f"[{s.host}]" if ":" in s.host else s.host
    return f"http://{host}:{s.port}"


def _interrupt(*_):
    raise KeyboardInterrupt


def run_server(target: ServeTarget, address: str | None = None) -> int:
    """The `serve` command after validation: start Ray and Serve, block until Ctrl-C or
    SIGTERM, then remove what it started (all of Serve, or only its application when it
    joined a cluster where Serve already ran). Returns the exit code."""
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    from ..run.cluster import ClusterStartError, init_ray
    from .app import APP_NAME

    s = target.spec.serve
    try:
        check_port_free(s.host, s.port)
        if s.direct_port is not None:
            for port in range(s.direct_port, s.direct_port + s.replicas):
                check_port_free(s.host, port)
        enable_direct_ingress(s.direct_port, joining=bool(address or target.spec.ray.address))
    except ServeSetupError as e:
        log.error("%s", e)
        return 2
    try:
        init_ray(target.spec, address)
    except ClusterStartError as e:
        log.error("%s", e)
        return 1
    # After ray.init, which installs its own SIGTERM handler (sys.exit): `kill` stops the
    # server as cleanly as Ctrl-C, exit code 0.
    signal.signal(signal.SIGTERM, _interrupt)
    serve_was_running = _get_global_client(raise_if_no_controller_running=False) is not None
    code, ours = 0, True
    try:
        url = start(target)
        src = target.source
        log.info("serving job '%s' (run %s) from %s with %d replica(s)", src.job, src.run_id, src.location(),
                 s.replicas)
        print(f"{url}/translate  (docs: {url}/docs, health: {url}/health); Ctrl-C stops", flush=True)
        if s.direct_port is not None:
            direct = replica_urls(s.host, s.port)
            if not direct:
                raise RuntimeError("serve.direct_port is set but no replica answers HTTP itself: was the "
                                   f"cluster started with {DIRECT_INGRESS}=1?")
            print("direct to the replicas (no Serve proxy): " + ", ".join(f"{u}/translate" for u in direct), flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping")
    except ServeSetupError as e:
        log.error("%s", e)
        code, ours = 2, False  # nothing was started
    except RuntimeError as e:  # a deployment that cannot start (e.g. a replica constructor error)
        log.error("serve failed: %s", e)
        code = 1
    finally:
        if ours:
            serve.delete(APP_NAME) if serve_was_running else serve.shutdown()
        ray.shutdown()
    return code
