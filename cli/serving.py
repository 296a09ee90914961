"""``mmcl-edge serve``: the Open Inference Protocol endpoint (optionally on Ray Serve)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from mmcl_edge.cli.common import DEFAULT_WORKSPACE, err, require_extra, user_errors
from mmcl_edge.errors import RuntimeUserError

@user_errors
def serve(workspace: Path = typer.Option(DEFAULT_WORKSPACE, "--workspace", "-w"),
          host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
          port: int = typer.Option(8000, min=0, max=65535, help="TCP port."),
          model_name: str = typer.Option("mmcl", help="The model's name in the protocol's URLs."),
          provider: Optional[str] = typer.Option(None, help="cpu, cuda or tensorrt (default: best available)."),
          threads: int = typer.Option(0, help="Threads per onnxruntime session (0: library default)."),
          poll: float = typer.Option(0.5, help="Seconds between looks at WS/current for a new pack."),
          ray: bool = typer.Option(False, "--ray", help="Serve on Ray Serve: --replicas copies behind one route."),
          replicas: int = typer.Option(1, min=1, help="With --ray: replicas, each following the current pack (with "
                                                      "--follow: each a follower, its copy in a folder under -w on "
                                                      "its own node)."),
          replica_cpus: float = typer.Option(1.0, help="With --ray: CPUs Ray reserves per replica."),
          ray_address: Optional[str] = typer.Option(None, help="With --ray: a running cluster ('auto' or "
                                                                "ray://host:port); default: start Ray here."),
          teach: bool = typer.Option(False, "--teach", help="Add the teaching routes: POST .../samples (labelled "
                                     "samples into a durable inbox), POST .../learn, GET .../learn/{id}."),
          teach_token_file: Optional[Path] = typer.Option(None, help="With --teach: a file holding the bearer token "
                                                                     "the teaching routes require (inference stays open)."),
          teach_inbox_mb: int = typer.Option(512, min=1, help="With --teach: the inbox's size limit (MiB); "
                                                              "a full inbox answers 409."),
          teach_inbox_samples: int = typer.Option(20000, min=1, help="With --teach: the inbox's limit in samples."),
          teach_max_forgetting: float = typer.Option(5.0, help="With --teach: the forgetting gate's limit "
                                                               "(points), as 'teach --max-forgetting'."),
          teach_warm: bool = typer.Option(False, "--teach-warm", help="With --teach: start the learner process "
                                          "with the service and keep it waiting for jobs (about 5 s less from "
                                          "'learn' to the new pack; the learner's memory stays taken while idle)."),
          teach_holdout: Optional[float] = typer.Option(None, help="With --teach: keep this fraction of each "
                                                                   "job's samples (per class) as held-out data."),
          max_body_mb: float = typer.Option(64, min=0.001, help="Largest request body in MiB, as sent and after "
                                                                "decompression; larger gets 413."),
          body_timeout: float = typer.Option(30, min=0.1, help="Seconds a request body may pause; then 408."),
          header_timeout: float = typer.Option(10, min=0.1, help="Seconds for a request's line and headers to arrive."),
          max_header_kb: int = typer.Option(16, min=1, help="Largest request line + headers in KiB; larger gets 431."),
          keep_alive: float = typer.Option(5, min=0.1, help="Seconds an idle connection stays open."),
          max_concurrency: int = typer.Option(64, min=1, help="Connections or requests in flight; more get 503."),
          follow: Optional[str] = typer.Option(None, "--follow", help="Run as a follower of the serve at this URL "
                                               "(http://HOST:PORT): keep -w DIR a verified copy of its backbones and "
                                               "packs and serve them; no learner, no PyTorch."),
          trusted_key: list[Path] = typer.Option([], "--trusted-key", help="Serve only packs signed by this Ed25519 "
                                                 "public key (repeatable); --follow requires one unless --insecure."),
          insecure: bool = typer.Option(False, "--insecure", help="With --follow and no --trusted-key: accept "
                                        "unsigned packs (integrity checks only; anyone on the link can feed packs)."),
          follow_wait: float = typer.Option(5.0, min=0.5, max=30, help="With --follow: seconds each long poll of the "
                                            "leader waits for a new pack; also bounds how late a follower notices "
                                            "that a cut link came back.")):
    """Serve the current pack over HTTP (Open Inference Protocol / KServe v2), swapping in new packs live."""
    require_extra("serve", "fastapi", "uvicorn", "prometheus_client")
    if follow is not None:
        if teach:
            raise RuntimeUserError("--follow serves what the leader learned: it does not go with --teach")
        if not trusted_key and not insecure:
            raise RuntimeUserError("--follow needs --trusted-key KEY (the leader's signing.pub), or --insecure to "
                                   "serve unsigned packs from whoever answers at that address")
    elif insecure:
        raise RuntimeUserError("--insecure goes with --follow")
    elif ray and trusted_key:
        raise RuntimeUserError("--trusted-key with --ray goes with --follow (replicas that follow a signing leader)")

    from mmcl_edge.runtime import Runtime
    from mmcl_edge.runtime.layout import resolve_root
    from mmcl_edge.runtime.server import ServerLimits, create_app, uvicorn_config

    limits = ServerLimits(max_body_bytes=int(max_body_mb * (1 << 20)), body_timeout=body_timeout,
                          header_timeout=header_timeout, max_header_bytes=max_header_kb << 10,
                          keep_alive=keep_alive, max_concurrency=max_concurrency)

    url = f"http://{host}:{port}/v2/models/{model_name}"
    if ray:
        require_extra("scale", "ray")
        from mmcl_edge.runtime import ray_serve

        followed = None
        if follow is not None:  # each replica follows the leader into its own folder under -w, on its node
            _check_keys(trusted_key)
            followed = {"leader": _leader_url(follow), "trusted_keys": [Path(k).expanduser().read_bytes() for k in trusted_key],
                        "wait": follow_wait}
        else:
            Runtime(workspace, providers=provider, threads=threads).stop()  # fail here, in plain words, if unusable
        err.print(f"deploying {replicas} replica(s) on Ray Serve at {url} (Open Inference Protocol)"
                  + (f", each following {followed['leader']}" if followed else "") + "; Ctrl-C stops", highlight=False)
        ray_serve.run(str(resolve_root(workspace)), host=host, port=port, model_name=model_name,
                      replicas=replicas, providers=provider, threads=threads, poll_seconds=poll,
                      replica_cpus=replica_cpus, address=ray_address, blocking=True, limits=limits, follow=followed)
        return
    settings = None
    if teach:
        require_extra("learn")  # the learner process trains the adapters
        from mmcl_edge.runtime.teach_routes import TeachSettings, read_token

        if teach_token_file is None:
            raise RuntimeUserError("--teach needs --teach-token-file: only the holder of that token may teach the device")
        settings = TeachSettings(read_token(teach_token_file), teach_inbox_mb << 20, teach_inbox_samples,
                                 teach_max_forgetting, teach_holdout, warm=teach_warm)
    elif teach_token_file is not None or teach_warm:
        raise RuntimeUserError(f"{'--teach-token-file' if teach_token_file is not None else '--teach-warm'} goes with --teach")
    follower = None
    if follow is not None:
        from mmcl_edge.runtime.follower import Follower, FollowerCollector

        leader = _leader_url(follow)
        _check_keys(trusted_key)
        follower = Follower(workspace, leader, model_name, trusted_keys=list(trusted_key), providers=provider,
                            threads=threads, wait=follow_wait, port=port)
        _check_port(host, port)
        err.print(f"following {leader} into {follower.root}", highlight=False)
        try:
            rt = follower.bootstrap(on_wait=lambda why: err.print(f"waiting for a pack from the leader: {why}",
                                                                  highlight=False, soft_wrap=True))
        except KeyboardInterrupt:  # Ctrl-C while the leader has not answered yet: nothing to undo
            raise typer.Exit(130) from None
    else:
        rt = Runtime(workspace, providers=provider, threads=threads, trusted_keys=list(trusted_key) or None)
    _check_port(host, port)
    import uvicorn

    if follower is None:
        rt.start_watcher(poll)
    else:
        follower.start()
    err.print(f"serving pack v{rt.pack.version:04d} of {rt.root} at {url} (Open Inference Protocol); "
              f"metrics at http://{host}:{port}/metrics; new packs swap in live; Ctrl-C stops", highlight=False)
    app = create_app(rt, model_name, teach=settings, limits=limits)
    if follower is not None:
        app.state.fleet.follower = follower
        app.state.metrics.registry.register(FollowerCollector(follower))
    try:
        uvicorn.Server(uvicorn_config(app, host=host, port=port)).run()
    finally:
        if follower is not None:
            follower.stop()
        if settings is not None and settings.warm:
            app.state.learner.stop()
        rt.stop()


def _check_keys(keys: list[Path]) -> None:
    """Every trusted key loads, or one plain line now, before any waiting for a leader or Ray."""
    if keys:
        from mmcl_edge.runtime.trust import load_public_key

        for k in keys:
            load_public_key(k)


def _leader_url(follow: str) -> str:
    leader = follow if "://" in follow else f"http://{follow}"
    if not leader.startswith(("http://", "https://")):
        raise RuntimeUserError(f"--follow takes an http:// URL of a running 'mmcl-edge serve', not {follow!r}")
    return leader


def _check_port(host: str, port: int) -> None:
    """A port in use is a user's problem: say so in one line, before any work."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:  # a port in use is a user's problem: say so in one line
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
        except OSError as exc:
            raise RuntimeUserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
