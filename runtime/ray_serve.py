"""Scale-out of ``mmcl-edge serve`` on Ray Serve (the ``scale`` extra: ``ray[serve]``).

N replicas of the very FastAPI app in ``server.py`` behind one route. Each replica is its own
process with its own ``Runtime``. Without ``follow`` it follows ``WS/current`` (the watcher): the
workspace folder must be readable at the same path on every node (one machine, or shared storage).
With ``follow`` each replica is a follower (``follower.py``) of a serve's URL, keeping its own copy in
a folder of its own under ``workspace`` on whatever node Ray placed it: no path is shared, and the
trusted keys travel as bytes. Torch-free, like the rest of the runtime.
"""
from __future__ import annotations

from mmcl_edge.runtime.server import ServerLimits, create_app
from mmcl_edge.runtime.service import Runtime


def build(workspace: str, model_name: str = "mmcl", replicas: int = 1, providers=None, threads: int = 0,
          poll_seconds: float = 0.5, replica_cpus: float = 1.0, limits: ServerLimits | None = None,
          follow: dict | None = None):
    """A bound Ray Serve application: ``replicas`` copies of the endpoint over ``workspace``. The
    request limits (size, body timeout) hold in each replica; Ray's proxy owns the connections.
    ``follow``: ``{"leader": URL, "trusted_keys": [PEM bytes], "wait": s}``: each replica follows that
    serve into its own folder under ``workspace`` on its node."""
    from ray import serve

    @serve.deployment(name="mmcl-edge", num_replicas=replicas, ray_actor_options={"num_cpus": replica_cpus})
    @serve.ingress()
    class MMCLReplica:
        def __init__(self, workspace: str, model_name: str, providers, threads: int, poll_seconds: float,
                     limits: ServerLimits | None, follow: dict | None):
            self.model_name, self.limits, self.follower = model_name, limits, None
            if follow:
                import os
                import socket
                from pathlib import Path

                from mmcl_edge.runtime.follower import Follower

                folder = Path(workspace) / f"replica-{socket.gethostname()}-{os.getpid()}"
                self.follower = Follower(folder, follow["leader"], model_name, trusted_keys=follow["trusted_keys"],
                                         providers=providers, threads=threads, wait=follow["wait"])
                self.runtime = self.follower.bootstrap()
                self.follower.start()
            else:
                self.runtime = Runtime(workspace, providers=providers, threads=threads)
                self.runtime.start_watcher(poll_seconds)

        def __serve_build_asgi_app__(self):
            app = create_app(self.runtime, self.model_name, limits=self.limits)
            if self.follower is not None:
                from mmcl_edge.runtime.follower import FollowerCollector

                app.state.fleet.follower = self.follower
                app.state.metrics.registry.register(FollowerCollector(self.follower))
            return app

        def __del__(self):
            if self.follower is not None:
                self.follower.stop()
            self.runtime.stop()

    return MMCLReplica.bind(str(workspace), model_name, providers, threads, poll_seconds, limits, follow)


def run(workspace: str, *, host: str = "127.0.0.1", port: int = 8000, model_name: str = "mmcl", replicas: int = 1,
        providers=None, threads: int = 0, poll_seconds: float = 0.5, replica_cpus: float = 1.0,
        address: str | None = None, blocking: bool = True, limits: ServerLimits | None = None,
        follow: dict | None = None):
    """Start (or join, with ``address``) Ray, deploy the endpoint on ``host:port`` and serve."""
    import time

    import ray
    from ray import serve

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False) if address else \
            ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    app = build(workspace, model_name, replicas, providers, threads, poll_seconds, replica_cpus, limits, follow)
    handle = serve.run(app, name="mmcl-edge", route_prefix="/")
    if not blocking:
        return handle
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:  # take the endpoint down; stop Ray if it was started here
        serve.delete("mmcl-edge")
        if started:
            serve.shutdown()
            ray.shutdown()
