"""Thread counts and wait policies, so that learning and serving share a few cores without starving.

On a small edge CPU the learner (PyTorch) and the runtime (onnxruntime) often run side by side.
With library defaults each process sizes its thread pools to every core, and PyTorch's OpenMP
threads spin-wait (burn a core) at every barrier for a while before sleeping. Two or three such
processes on two cores oversubscribe them: a thread that holds up a barrier is descheduled while
its siblings spin, and a task whose adapters train in about 1 s alone took 98-139 s beside two
other processes. The policy here, the default:

* learner (PyTorch), a background job: half the cores (at least 1, at most 8: the side network's
  small matrices gain little from more; 2 cores: one), so the other half stays with the serving
  process; ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep instead of spinning; set before
  torch is imported, by the CLI entry point); inter-op threads = 1 (eager training never runs
  graph ops in parallel);
* runtime (onnxruntime), latency first: onnxruntime's default intra-op threads (every physical
  core) with spinning off (``runtime/providers.py``): an idle pool thread sleeps and leaves its
  core to the learner, a request still gets every core the learner does not hold. Measured on 2
  cores (``bench learn --while-serving``), this served faster alone and beside the learner than
  one runtime thread did, and kept both sides within 2x of their time alone. Backbones of like
  cost run side by side instead, one thread each (lanes, ``runtime/backbones.py``);
* both: numpy's OpenBLAS gets one thread (``OPENBLAS_NUM_THREADS=1``, set with the OpenMP policy:
  its idle workers busy-wait too, and the preprocessing's matrices are tiny). A ``Runtime`` made from
  Python, after numpy was imported, sets the same limit through threadpoolctl (``limit_blas``):
  AV-Digits through the public API, 2 cores, batch 1: 2.42 ms a request with it, 3.73 without.

Knobs (environment, read when the policy is applied; the config key wins for the learner):

* ``train.threads`` (``--set train.threads=N``) or ``MMCL_EDGE_LEARN_THREADS``: PyTorch threads;
* ``MMCL_EDGE_SERVE_THREADS``: onnxruntime intra-op threads where none are given
  (``Runtime(threads=0)``; unset: onnxruntime's default; set, no lanes);
* ``MMCL_EDGE_SERVE_LANES`` (auto/on/off, ``runtime/backbones.py``), ``MMCL_EDGE_SERVE_SPIN``
  (never/run/always, ``runtime/providers.py``) and ``MMCL_EDGE_SWAP_NICE`` (``runtime/service.py``):
  how the runtime spreads a request over the cores, how its idle threads wait, who yields in a swap;
* ``MMCL_EDGE_THREAD_POLICY=off``: library defaults everywhere (what ``bench learn
  --thread-policy off`` measures); an ``OMP_WAIT_POLICY`` / ``KMP_BLOCKTIME`` /
  ``OPENBLAS_NUM_THREADS`` (or ``OMP_NUM_THREADS``) you set yourself is always kept.

Torch-free: the runtime imports this module.
"""
from __future__ import annotations

import os
import sys

POLICY_ENV = "MMCL_EDGE_THREAD_POLICY"
LEARN_THREADS_ENV = "MMCL_EDGE_LEARN_THREADS"
SERVE_THREADS_ENV = "MMCL_EDGE_SERVE_THREADS"
_SET_BY_US_ENV = "MMCL_EDGE_THREAD_ENV_SET"   # which of the variables below the policy set (not the user)

# set before torch (and its OpenMP runtime) loads; libgomp reads them once, at load
# (and numpy's OpenBLAS: one thread, its workers otherwise busy-wait too; the runtime's preprocessing
# matmuls are tiny)
OPENMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0", "OPENBLAS_NUM_THREADS": "1"}
MAX_LEARN_THREADS = 8


def enabled() -> bool:
    return os.environ.get(POLICY_ENV, "on").strip().lower() not in ("off", "0", "false", "no")


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _env_int(name: str) -> int:
    try:
        return max(0, int(os.environ.get(name, "0").strip() or 0))
    except ValueError:
        return 0


def env_choice(name: str, choices: dict[str, str], default: str) -> str:
    """A knob that takes one of a few words: ``choices`` maps each accepted spelling to its meaning;
    anything else is a RuntimeUserError naming the variable and what it accepts."""
    from mmcl_edge.errors import RuntimeUserError

    value = os.environ.get(name, default).strip().lower()
    if value not in choices:
        raise RuntimeUserError(f"{name}={value!r} is not one of: {', '.join(choices)}")
    return choices[value]


def learn_threads(configured: int = 0) -> int:
    """PyTorch threads for the learner: ``train.threads``, else the env knob, else half the cores
    (1..8); 0 = leave PyTorch's default (the policy is off and nothing was asked for)."""
    if configured:
        return configured
    if _env_int(LEARN_THREADS_ENV):
        return _env_int(LEARN_THREADS_ENV)
    if not enabled():
        return 0
    return max(1, min(MAX_LEARN_THREADS, cpu_count() // 2))


def serve_threads(configured: int = 0) -> int:
    """onnxruntime intra-op threads for the runtime: ``threads`` given, else the env knob, else 0
    (onnxruntime's default, policy on or off)."""
    return configured or _env_int(SERVE_THREADS_ENV)


BLAS_THREAD_ENV = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def limit_blas() -> bool:
    """numpy's BLAS to one thread in this whole process, now (numpy may already be loaded, so the
    environment variable would be too late), unless the policy is off or the user chose BLAS
    threads; True when the limit was applied. Its only callers serve requests, whose numpy
    products are tiny: more BLAS threads only wait on, and take, the backbones' cores."""
    if not enabled() or any(os.environ.get(k) for k in BLAS_THREAD_ENV if k not in _set_by_us()):
        return False
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # an install without it: the library default stays
        return False
    threadpool_limits(1, user_api="blas")
    return True


def _set_by_us() -> set[str]:
    return set(filter(None, os.environ.get(_SET_BY_US_ENV, "").split(",")))


def apply_env_defaults() -> None:
    """Set the OpenMP wait policy for this process and its children, unless the user set it or the
    policy is off. Call before torch is imported (the CLI entry point does); later it changes nothing
    in this process (libgomp has read it), only in child processes."""
    if not enabled():
        return
    ours = _set_by_us()
    for key, value in OPENMP_ENV.items():
        if key not in os.environ:
            os.environ[key] = value
            ours.add(key)
    if ours:
        os.environ[_SET_BY_US_ENV] = ",".join(sorted(ours))


def child_env(policy: bool = True) -> dict[str, str]:
    """The environment for a child process with the policy on (its OpenMP variables set, unless the
    user set them) or off (library defaults: the variables the policy set are removed; the user's
    own are kept)."""
    env = dict(os.environ)
    ours = set(filter(None, env.pop(_SET_BY_US_ENV, "").split(",")))
    if policy:
        env.pop(POLICY_ENV, None)
        for key, value in OPENMP_ENV.items():
            if key not in env:
                env[key] = value
                ours.add(key)
        if ours:
            env[_SET_BY_US_ENV] = ",".join(sorted(ours))
        return env
    for key in ours:
        env.pop(key, None)
    env[POLICY_ENV] = "off"
    return env


def apply_torch(configured: int = 0) -> dict:
    """Apply the learner's thread counts to PyTorch (imported by now); returns what is in force."""
    import torch

    n = learn_threads(configured)
    if n and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    if enabled() and torch.get_num_interop_threads() != 1:
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # only settable before the first inter-op work; then it stays as it is
            pass
    return describe()


def describe() -> dict:
    """The thread settings in force in this process (for benchmark JSON)."""
    d = {"policy": "on" if enabled() else "off", "cpus": cpu_count(),
         "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "serve_threads": serve_threads()}
    torch = sys.modules.get("torch")
    if torch is not None:
        d["torch_threads"] = torch.get_num_threads()
        d["torch_interop_threads"] = torch.get_num_interop_threads()
    return d
