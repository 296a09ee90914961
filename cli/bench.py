"""``mmcl-edge bench ...``: the benchmark commands (the tools are in mmcl_edge/bench/)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table
from mmcl_edge.cli.common import (DATA_DIR_HELP, DEFAULT_WORKSPACE, SCENARIO_HELP, _pct, err, out, parse_overrides,
                                  require_extra, user_errors)
from mmcl_edge.errors import ConfigError, WorkspaceError

bench_app = typer.Typer(no_args_is_help=True,
                        help="Benchmarks: continual-learning accuracy, encoders, latency, swaps, learning cost, soak.")


@bench_app.command("cl")
@user_errors
def bench_cl(
    scenario: str = typer.Option("avdigits-cil", help=SCENARIO_HELP),
    data: Optional[Path] = typer.Option(None, help="Your data in the generic format; replaces --scenario."),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
    setting: str = typer.Option("class-il", help="With --data: class-il or domain-il."),
    classes_per_task: int = typer.Option(2, help="With --data and class-il: classes per task."),
    methods: str = typer.Option("all", help="Comma-separated names, 'all', 'baselines' or 'ablations'."),
    seeds: int = typer.Option(3, min=1, help="Runs per method with seeds 0..N-1 (class order and training)."),
    out_file: Path = typer.Option(Path("bench-cl.json"), "--out", help="Where the JSON result goes."),
    plot: Optional[Path] = typer.Option(None, help="Write PNG plots into this folder."),
    cache: Path = typer.Option(Path("mmcl-bench-cache"), help="Tap cache shared by all methods and runs."),
    validation: bool = typer.Option(False, help="Evaluate on a validation split carved from the training data "
                                                "(for choosing hyper-parameters), not on the test split."),
    epochs: Optional[int] = typer.Option(None, help="Adapter training epochs per task (all trainable methods)."),
    set_: list[str] = typer.Option([], "--set", help="Config override key=value, e.g. baselines.ewc_lambda=100."),
    workers: int = typer.Option(0, help="Runs in parallel, one torch thread each (0: min(2, CPU cores))."),
    ray: bool = typer.Option(False, "--ray", help="Run the method x seed jobs as Ray tasks (the scale extra)."),
    ray_address: Optional[str] = typer.Option(None, help="With --ray: a running cluster ('auto', ray://host:port); "
                                                         "default: start Ray on this machine."),
):
    """Continual-learning benchmark: the method, its ablations and the baselines, side by side."""
    require_extra("learn")
    if ray or ray_address:
        require_extra("scale", "ray")
    from mmcl_edge.bench.cl import ScenarioSpec, run_cl_benchmark
    from mmcl_edge.cli.progress import progress_bar
    from mmcl_edge.config import LearnConfig
    from mmcl_edge.learners import BASELINE_NAMES, method_names

    overrides = parse_overrides(set_)
    if epochs is not None:
        overrides["train.epochs"] = epochs
    config = LearnConfig().override(overrides)
    if data_dir is None and os.environ.get("MMCL_EDGE_DATA"):
        data_dir = Path(os.environ["MMCL_EDGE_DATA"])

    spec = ScenarioSpec(None if data else scenario, str(data.expanduser().resolve()) if data else None,
                        str(data_dir.expanduser().resolve()) if data_dir else None, setting, classes_per_task,
                        validation)
    first = spec.load(0)
    known = method_names(first.modalities)
    groups = {"all": known, "baselines": list(BASELINE_NAMES),
              "ablations": [m for m in known if m.startswith("mmcl")]}
    chosen = groups.get(methods) or [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in known]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(known)}")
    err.print(f"[bold]{first.name}[/]: {len(chosen)} methods x {seeds} seeds, {len(first.tasks)} tasks"
              + (" — validation split" if validation else ""))

    def on_result(name, seed, rep):
        err.print(f"  {name:22s} seed {seed}: final {_pct(rep['final_average_accuracy'])}%  "
                  f"forgetting {_pct(rep['forgetting'])}  learn {rep['learn_seconds']:.1f}s")

    result = run_cl_benchmark(spec, chosen, seeds, config, cache, progress_bar, on_result, workers,
                              ray=bool(ray or ray_address), ray_address=ray_address)
    result["validation"] = validation
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2))
    t = Table(title=f"{result['scenario']} ({result['setting']}), mean ± std over {seeds} seed(s), %")
    for c in ("method", "final avg acc", "avg incremental acc", "forgetting", "learn s"):
        t.add_column(c, justify="right" if c != "method" else "left")
    for name, e in result["methods"].items():
        pm = lambda k, scale=100: f"{scale * e[k]:.1f} ± {scale * e[k + '_std']:.1f}"
        t.add_row(name, pm("final_average_accuracy"), pm("average_incremental_accuracy"), pm("forgetting"),
                  pm("learn_seconds", 1))
    out.print(t)
    gone = {n: e["missing_modality"] for n, e in result["methods"].items() if e.get("missing_modality")}
    if gone:
        modalities = list(next(iter(gone.values())))
        g = Table(title="Final average accuracy (%) with one modality missing from every test sample")
        for c in ("method", *(f"without {m}" for m in modalities)):
            g.add_column(c, justify="right" if c != "method" else "left")
        for name, missing in gone.items():
            g.add_row(name, *(_pct(missing[m]).strip() for m in modalities))
        out.print(g)
    out.print(f"results: {out_file}")
    if plot:
        from mmcl_edge.bench.plots import write_plots

        try:
            paths = write_plots(result, plot)
        except ImportError:
            raise ConfigError("--plot needs matplotlib: pip install 'mmcl-edge[plots]' (the JSON is written)") from None
        out.print(f"{len(paths)} plots in {plot}")


@bench_app.command("learn")
@user_errors
def bench_learn(
    workspace: Path = typer.Option(DEFAULT_WORKSPACE, "--workspace", "-w", help="An existing workspace (its scenario "
                                                                                 "and config; nothing in it is changed)."),
    task: int = typer.Option(0, help="Which task of the stream to learn (0-based)."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs (default: the workspace's train.epochs)."),
    max_samples: Optional[int] = typer.Option(None, help="Use the first N of a seeded shuffle of the task's training "
                                                         "samples, the same for every path (bounds the backprop path)."),
    while_serving: bool = typer.Option(False, "--while-serving", help="Instead: learn beside a runtime serving at "
                                                                      "batch 1 in another process; both sides quiet vs together."),
    serve_seconds: float = typer.Option(10.0, min=0.5, help="With --while-serving: how long the runtime serves alone."),
    thread_policy: str = typer.Option("on", help="on: the thread policy (mmcl_edge/threads.py); off: library "
                                                 "defaults in the measured processes (the 'before')."),
    out_file: Path = typer.Option(Path("bench-learn.json"), "--out", help="Where the JSON result goes."),
):
    """Learning cost: one task on cached taps vs back-propagating through the backbone, each in a fresh process.

    Time and peak resident memory of each path and the ratio (b)/(a); the full method's learn_task on taps for reference. --while-serving: learn time and the runtime's p50/p99 latency, each quiet vs while the other runs.
    """
    require_extra("learn")
    from mmcl_edge.cli.progress import progress_bar
    from mmcl_edge.bench.learn import run_learn_bench, run_while_serving

    if thread_policy not in ("on", "off"):
        raise ConfigError(f"--thread-policy must be on or off, not {thread_policy!r}")
    policy = thread_policy == "on"
    f = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    if while_serving:
        result = run_while_serving(workspace, task, epochs, max_samples, serve_seconds, policy, progress_bar,
                                   log=lambda s: err.print(s, highlight=False))
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(result, indent=2))
        lr, sv = result["learn"], result["serve"]
        t = Table(title=f"Learning beside serving — {result['scenario']} task {task}, thread policy {thread_policy}")
        for c in ("measure", "alone", "together", "ratio"):
            t.add_column(c, justify="left" if c == "measure" else "right")
        t.add_row("learn s", f(lr["quiet_s"], ".2f"), f(lr["while_serving_s"], ".2f"), f(lr["ratio"], ".2f"))
        for q in ("p50", "p99"):
            t.add_row(f"serve {q} ms", f(sv["quiet"][f"{q}_ms"], ".2f"), f(sv["while_learning"][f"{q}_ms"], ".2f"),
                      f(sv[f"{q}_ratio"], ".2f"))
        out.print(t)
    else:
        result = run_learn_bench(workspace, task, epochs, max_samples, policy, progress_bar)
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(result, indent=2))
        p = result["paths"]
        sub = f", {result['samples']} of {result['task_train_samples']} samples" if result["subsampled"] else ""
        t = Table(title=f"Learning one task — {result['scenario']} task {task}, {result['epochs']} epochs{sub}")
        for c in ("path", "time s", "peak MB"):
            t.add_column(c, justify="left" if c == "path" else "right")
        t.add_row("(a) taps", f(p["taps"]["seconds"], ".1f"), f(p["taps"]["peak_rss_mb"], ".0f"))
        t.add_row("(b) backprop", f(p["backprop"]["seconds"], ".1f"), f(p["backprop"]["peak_rss_mb"], ".0f"))
        t.add_row("(b)/(a)", f(result["ratio_seconds"], ".1f") + "x", f(result["ratio_peak_rss"], ".1f") + "x")
        t.add_row("full method", f(p["full"]["seconds"], ".1f"), f(p["full"]["peak_rss_mb"], ".0f"))
        out.print(t)
    out.print(f"results: {out_file}")


@bench_app.command("encoders")
@user_errors
def bench_encoders(
    scenario: str = typer.Option("utd-mhad-cil", help=SCENARIO_HELP),
    data: Optional[Path] = typer.Option(None, help="Your data in the generic format; replaces --scenario."),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
    out_file: Path = typer.Option(Path("bench-encoders.json"), "--out", help="Where the JSON result goes."),
    cache: Path = typer.Option(Path("mmcl-bench-cache"), help="Tap cache (shared with bench cl)."),
):
    """Linear-probe accuracy of every encoding of every modality (which frozen encoder sees the classes)."""
    require_extra("learn")
    from mmcl_edge.cli.progress import progress_bar
    from mmcl_edge.data import load_scenario
    from mmcl_edge.bench.probe import probe_encoders

    if data_dir is None and os.environ.get("MMCL_EDGE_DATA"):
        data_dir = Path(os.environ["MMCL_EDGE_DATA"])
    sc = load_scenario(None if data else scenario, data=str(data) if data else None,
                       data_dir=str(data_dir) if data_dir else None)
    result = probe_encoders(sc, cache, progress_bar)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2))
    t = Table(title=f"Linear probe (ridge on pooled frozen taps, all classes at once) — {result['scenario']}, %")
    for c in ("modality", "encoding", "backbone", "features", "validation acc", "test acc", "extract s"):
        t.add_column(c, justify="left" if c in ("modality", "encoding", "backbone") else "right")
    for r in result["rows"]:
        t.add_row(r["modality"], r["encoding"] + (" (default)" if r["default"] else ""), r["backbone"],
                  str(r["feature_dim"]), _pct(r["validation_accuracy"]), _pct(r["test_accuracy"]),
                  f"{r['extract_seconds']:.1f}")
    fused = result["all_modalities_default_encodings"]
    t.add_row("all", "defaults", "", "", _pct(fused["validation_accuracy"]), _pct(fused["test_accuracy"]), "")
    out.print(t)
    out.print(f"results: {out_file}")


@bench_app.command("teach")
@user_errors
def bench_teach(
    scenario: str = typer.Option("utd-mhad-cil", help="A class-incremental built-in stream: utd-mhad-cil or avdigits-cil."),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
    shots: str = typer.Option("1,5,all", help="Training samples per new class, comma-separated ('all': every one)."),
    epochs: Optional[int] = typer.Option(None, help="Adapter epochs per task (default: the configuration's)."),
    serve: bool = typer.Option(True, help="Measure teach-to-serve on a real 'serve --teach' (with 5 shots)."),
    work: Path = typer.Option(Path("mmcl-bench-teach"), help="Folder for the task folders and workspaces."),
    out_file: Path = typer.Option(Path("bench-teach.json"), "--out", help="Where the JSON result goes."),
    seed: int = typer.Option(0, help="Class order and the choice of the few samples."),
    new_subject: bool = typer.Option(True, help="UTD-MHAD: keep the first test subject out of the held-out data and "
                                                "teach its samples of known classes last (--no-new-subject: the stream "
                                                "exactly as 'learn --scenario' sees it, for comparing the two paths)."),
    teach_warm: bool = typer.Option(False, "--teach-warm", help="Teach-to-serve with 'serve --teach --teach-warm' "
                                                               "(the learner process started and waiting)."),
):
    """Tasks arriving as folders, taught one by one (as 'mmcl-edge teach' does): accuracy matrix, forgetting, the gate's decisions and two baselines (imprinting, ridge on frozen features) for 1, 5 and all samples per new class; novelty AUROC; teach-to-serve seconds on a live server.

    JSON keys: runs.<shots>.{mmcl,imprinting,ridge}.{final_average_accuracy,average_incremental_accuracy,forgetting,accuracy_matrix}, runs.<shots>.gate[].{task,would_refuse,drop_points,p_value} (the gate measures only: every method learns the same tasks), runs.all.novelty.{auroc,seen_flagged,unseen_flagged,threshold}, runs.5.teach_to_serve.{teach_to_serve_seconds,learn_seconds,quiet_p99_ms,learning_p99_ms,p99_ratio}.
    """
    require_extra("learn")
    from mmcl_edge.bench.teach import run_teach_bench
    from mmcl_edge.cli.progress import progress_bar
    from mmcl_edge.errors import ConfigError

    if data_dir is None and os.environ.get("MMCL_EDGE_DATA"):
        data_dir = Path(os.environ["MMCL_EDGE_DATA"])
    try:
        counts = [None if k.strip() == "all" else int(k) for k in shots.split(",") if k.strip()]
    except ValueError:
        raise ConfigError(f"--shots takes numbers and 'all', comma-separated, not {shots!r}") from None
    if not counts or any(k is not None and k < 1 for k in counts):
        raise ConfigError("--shots needs at least one count of 1 or more (or 'all')")
    if serve and 5 not in counts:
        err.print("note: teach-to-serve is measured with 5 samples per class; add 5 to --shots to measure it")
    result = run_teach_bench(scenario, str(data_dir) if data_dir else None, counts, work, epochs, seed, serve,
                             say=lambda m: err.print(m, highlight=False), progress=progress_bar, new_subject=new_subject,
                             warm=teach_warm)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2))
    t = Table(title=f"Teaching {scenario} task by task — final average accuracy (%), forgetting (points)")
    for c in ("samples / new class", "mmcl", "imprinting", "ridge (frozen)", "mmcl forgetting", "gate"):
        t.add_column(c, justify="right")
    for label, run in result["runs"].items():
        refused = [str(g["task"]) for g in run["gate"] if g["would_refuse"]]
        gate = f"would refuse task {', '.join(refused)}" if refused else "none refused"
        t.add_row(label, _pct(run["mmcl"]["final_average_accuracy"]), _pct(run["imprinting"]["final_average_accuracy"]),
                  _pct(run["ridge"]["final_average_accuracy"]), _pct(run["mmcl"]["forgetting"]), gate)
    out.print(t)
    nov = (result["runs"].get("all") or {}).get("novelty")
    if nov:
        out.print(f"novelty after {nov['known_classes']} classes: AUROC {nov['auroc']:.3f}; flagged unknown: "
                  f"{100 * nov['seen_flagged']:.1f}% of seen-class samples, {100 * nov['unseen_flagged']:.1f}% of unseen")
    tts = (result["runs"].get("5") or {}).get("teach_to_serve")
    if tts:
        num = lambda v, unit="", fmt=".1f": "–" if v is None else f"{v:{fmt}}{unit}"  # noqa: E731
        out.print(f"teach-to-serve: {num(tts['teach_to_serve_seconds'], ' s')} from POST learn to the first answer "
                  f"naming a new class (learning {num(tts['learn_seconds'], ' s')}, job {tts['job'].get('state')}); "
                  f"serving p99 {num(tts['quiet_p99_ms'], ' ms')} quiet, {num(tts['learning_p99_ms'], ' ms')} while "
                  f"learning ({num(tts['p99_ratio'], 'x', '.2f')})")
    out.print(f"results: {out_file}")


@bench_app.command("soak")
@user_errors
def bench_soak(
    workspace: Path = typer.Option(DEFAULT_WORKSPACE, "--workspace", "-w"),
    minutes: float = typer.Option(10.0, min=0.01, help="How long to serve (the acceptance soak: 10)."),
    threads: int = typer.Option(4, min=1, help="Client threads calling predict in a loop."),
    provider: Optional[str] = typer.Option(None, help="cpu, cuda or tensorrt (default: best available)."),
    out_file: Path = typer.Option(Path("bench-soak.json"), "--out", help="Where the JSON result goes."),
):
    """Soak: threads predict while the last task is re-learned and its packs hot-swapped in, for N minutes.

    Requests, failures, swaps, p50/p99 and the serving process's resident memory (start, after warm-up, end). The learner re-learns the workspace's last task over and over (a new pack each time, in WS/packs): soak a copy of a workspace you care about. Ctrl-C stops early; the JSON is written.
    """
    require_extra("learn")  # the learner child; the serving side (this process) stays torch-free
    from mmcl_edge.runtime.latency import workspace_test_samples
    from mmcl_edge.bench.soak import run_soak
    from mmcl_edge.runtime.layout import resolve_root

    root = resolve_root(workspace)
    if not (root / "workspace.json").is_file():
        raise WorkspaceError(f"{root} is not a workspace (no workspace.json); create one with 'mmcl-edge learn'")
    samples, why = workspace_test_samples(root)
    if samples is None:
        err.print(f"note: the workspace's test data cannot be loaded here ({why}); serving random inputs "
                  "of the right shapes (answers are still checked)", highlight=False)
    err.print(f"soak: {threads} client thread(s) for {minutes:g} min on {root}; the learner re-learns the last task "
              "in a child process (Ctrl-C stops)", highlight=False)

    def on_progress(s: dict) -> None:
        p99 = "–" if s["p99_ms"] is None else f"{s['p99_ms']:.2f}"
        rss = "–" if s["rss_mb"] is None else f"{s['rss_mb']:.0f}"
        learner = "running" if s["learner_running"] else f"exited ({s['learner_exit_code']})"
        err.print(f"{s['elapsed_s']:6.0f}s  requests {s['requests']}  failures {s['failures']}  swaps {s['swaps']}  "
                  f"packs {s['packs_published']} (serving v{s['pack']:04d})  p99 {p99} ms  rss {rss} MB  "
                  f"learner {learner}", highlight=False)

    result = run_soak(root, minutes, threads, samples, providers=provider, progress=on_progress)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2))
    t = Table(title=f"Soak — {result['seconds']:.0f}s, {threads} client thread(s), {result['inputs']} inputs"
                    + (" (interrupted)" if result["interrupted"] else ""))
    for c in ("requests", "failures", "swaps", "rejected", "packs published", "p50 ms", "p99 ms",
              "RSS start / warm / end MB", "growth after warm-up", "learner exit"):
        t.add_column(c, justify="right")
    f = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    t.add_row(str(result["requests"]), str(result["failures"]), str(result["swaps"]), str(result["rejected_packs"]),
              str(result["packs_published"]), f(result["p50_ms"], ".2f"), f(result["p99_ms"], ".2f"),
              " / ".join(f(result[k], ".0f") for k in ("rss_start_mb", "rss_warm_mb", "rss_end_mb")),
              f(result["rss_growth_after_warmup_pct"], "+.1f") + ("%" if result["rss_growth_after_warmup_pct"] is not None else ""),
              str(result["learner_exit_code"]))
    out.print(t)
    for e in result["errors"]:
        err.print(f"[red]failed:[/] {escape(e)}", highlight=False)
    if result["learner_exit_code"] not in (0, None):
        err.print("[yellow]learner:[/] " + escape(" | ".join(result["learner_output_tail"][-3:])), highlight=False)
    out.print(f"results: {out_file}")
    if result["interrupted"]:
        raise typer.Exit(130)


@bench_app.command("latency")
@user_errors
def bench_latency(
    workspace: Path = typer.Option(DEFAULT_WORKSPACE, "--workspace", "-w"),
    batch: list[int] = typer.Option([1, 8], help="Batch sizes to measure (repeat the option)."),
    repeats: int = typer.Option(50, min=5, help="Timed calls per batch size."),
    provider: Optional[str] = typer.Option(None, help="cpu, cuda or tensorrt (default: best available)."),
    threads: int = typer.Option(0, help="Threads per session and for PyTorch (0: library default)."),
    memory: bool = typer.Option(True, help="Measure the runtime's resident memory in a fresh process."),
    out_file: Path = typer.Option(Path("bench-latency.json"), "--out", help="Where the JSON result goes."),
):
    """Per-stage latency of the runtime (p50/p95/p99) against its bare backbones and PyTorch eager;
    each backbone's FLOPs and achieved GFLOP/s; resident memory; model, pack and swap costs.

    JSON: batches.<b>.{stages_ms, end_to_end_ms, p99_over_p50, sessions_ms, python_overhead_ms, bare_backbone_ms,
    bare_backbones_p50_ms, runtime_session_backbone_ms, runtime_session_backbones_p50_ms,
    bare_no_spin_backbone_ms, bare_no_spin_backbones_p50_ms, pack_over_backbone, total_over_bare_backbones,
    total_over_bare_no_spin_backbones, backbone_gflops_per_s, pytorch_eager_ms,
    speedup_vs_eager, throughput_samples_per_s}; backbone_flops, reference_gflops, backbone_bytes,
    pack_bytes, pack_kb, swap_ms, runtime_memory_mb.{rss_mb, peak_rss_mb}, providers, pack_providers,
    lanes, bare, loadavg (benchmarks/README.md says what each means).
    """
    import importlib.util

    from mmcl_edge.runtime import Runtime
    from mmcl_edge.runtime.latency import (batch_of, example_inputs, measure_bare_backbones, measure_predict,
                                           measure_swap, runtime_footprint, servable_packs, workspace_test_samples)
    from mmcl_edge.runtime.layout import resolve_root

    root = resolve_root(workspace)
    if not (root / "workspace.json").is_file():
        raise WorkspaceError(f"{root} is not a workspace (no workspace.json); create one with 'mmcl-edge learn'")
    rt = Runtime(root, providers=provider, threads=threads)
    bb_dir = root / "backbones"
    result = {"workspace": str(root), "providers": rt.providers, "pack_providers": rt.pack_providers,
              "bare": "onnxruntime.InferenceSession(path) with onnxruntime's defaults, preprocessed input",
              "bare_no_spin": "the same with 2 intra-op threads and spinning off (issue #19's reference)",
              "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
              "backbones": rt.backbones.backends, "lanes": rt.backbones.lanes,
              "pack_kb": sum(f.stat().st_size for f in rt.pack.folder.iterdir()) // 1024,
              "pack_bytes": {f.name: f.stat().st_size for f in rt.pack.folder.iterdir()},
              "backbone_bytes": {m: (bb_dir / e["file"]).stat().st_size for m, e in rt.backbones.index.items()},
              "batches": {}}
    samples, why = workspace_test_samples(root)
    if samples is None:
        err.print(f"note: the workspace's test data cannot be loaded here ({why}); timing random inputs "
                  "of the right shapes", highlight=False)
        result["inputs"] = "random"
    try:
        have_onnx = importlib.util.find_spec("onnx") is not None
        have_torch = importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        have_onnx = have_torch = False
    if have_onnx:
        from mmcl_edge.export.flops import count_flops, reference_gflops

        result["backbone_flops"] = {m: count_flops(bb_dir / e["file"], sample_shape=e["input_shape"])["flops"] for m, e in rt.backbones.index.items()}
        result["reference_gflops"] = reference_gflops(threads)
    else:
        err.print("note: FLOPs not counted: the onnx package is not installed (the learn extra)", highlight=False)
    eager: dict = {}
    if have_torch and samples is not None:
        from mmcl_edge.bench.eager import measure_in_child

        eager = measure_in_child(root, batch, repeats, threads)  # {batch: stages} or {"skipped": why}
    else:
        eager = {"skipped": "the workspace's test data cannot be loaded" if have_torch else
                 "PyTorch is not installed here (it comes with the learn extra: pip install 'mmcl-edge[learn]')"}
    if "skipped" in eager:
        err.print(f"note: PyTorch-eager comparison skipped: {escape(eager['skipped'])}", highlight=False)
        result["pytorch_eager"] = f"skipped: {eager['skipped']}"

    for b in batch:
        inputs = batch_of(samples, b) if samples is not None else example_inputs(rt, b)
        entry = measure_predict(rt, inputs, repeats)
        bare = measure_bare_backbones(rt, inputs, repeats)
        entry["bare_backbone_ms"] = bare
        entry["bare_backbones_p50_ms"] = sum(p["p50"] for p in bare.values())
        own = measure_bare_backbones(rt, inputs, repeats, sessions="runtime")  # the same, in the runtime's sessions
        entry["runtime_session_backbone_ms"] = own
        entry["runtime_session_backbones_p50_ms"] = sum(p["p50"] for p in own.values())
        asleep = measure_bare_backbones(rt, inputs, repeats, sessions="two-threads-no-spin")  # issue #19's reference
        entry["bare_no_spin_backbone_ms"] = asleep
        entry["bare_no_spin_backbones_p50_ms"] = sum(p["p50"] for p in asleep.values())
        st = entry["stages_ms"]
        entry["pack_over_backbone"] = st["pack"]["p50"] / st["backbone"]["p50"]
        # end to end as the caller sees it, over backbones in plain sessions: the ratio a user would measure
        entry["total_over_bare_backbones"] = entry["end_to_end_ms"]["p50"] / entry["bare_backbones_p50_ms"]
        entry["total_over_bare_no_spin_backbones"] = entry["end_to_end_ms"]["p50"] / entry["bare_no_spin_backbones_p50_ms"]
        if "backbone_flops" in result:
            entry["backbone_gflops_per_s"] = {m: b * result["backbone_flops"][m] / (p["p50"] * 1e-3) / 1e9
                                              for m, p in bare.items()}
        if str(b) in eager:  # the same stages in PyTorch eager, same inputs (a child process, PyTorch's threading)
            entry["pytorch_eager_ms"] = eager[str(b)]
            entry["speedup_vs_eager"] = {k: eager[str(b)][k]["p50"] / st[k]["p50"] for k in ("backbone", "pack", "total")}
        result["batches"][str(b)] = entry
    result["swap_ms"] = measure_swap(rt, servable_packs(rt))
    if memory:
        one = {m: s[0] for m, s in samples.items()} if samples is not None else \
            {m: v[0] for m, v in example_inputs(rt, 1).items()}
        result["runtime_memory_mb"] = runtime_footprint(root, one, provider, threads)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2))
    t = Table(title=f"Latency (ms) — {', '.join(sorted(set(rt.backbones.backends.values())))}")
    for c in ("batch", "stage", "p50", "p99", "p99/p50", "eager p50", "speed-up"):
        t.add_column(c, justify="right")
    for b, e in result["batches"].items():
        for stage, p in e["stages_ms"].items():
            eager = (e.get("pytorch_eager_ms") or {}).get(stage)
            t.add_row(b, stage, f"{p['p50']:.2f}", f"{p['p99']:.2f}", f"{p['p99'] / p['p50']:.2f}",
                      f"{eager['p50']:.2f}" if eager else "–", f"{eager['p50'] / p['p50']:.1f}x" if eager else "–")
        for name, key in (("end to end", "end_to_end_ms"), ("in onnxruntime", "sessions_ms"),
                          ("Python overhead", "python_overhead_ms")):
            if key in e:
                p = e[key]
                t.add_row(b, name, f"{p['p50']:.2f}", f"{p['p99']:.2f}", "", "", "")
        t.add_row(b, "bare backbones", f"{e['bare_backbones_p50_ms']:.2f}", "", "", "", "")
        t.add_row(b, "  in the runtime's sessions", f"{e['runtime_session_backbones_p50_ms']:.2f}", "", "", "", "")
        t.add_row(b, "  2 threads, no spinning", f"{e['bare_no_spin_backbones_p50_ms']:.2f}", "", "", "", "")
        t.add_row(b, "pack/backbone", f"{e['pack_over_backbone']:.1%}", "", "", "", "")
        t.add_row(b, "total/bare", f"{e['total_over_bare_backbones']:.2f}x", "", "", "", "")
        t.add_row(b, "  over no-spin bare", f"{e['total_over_bare_no_spin_backbones']:.2f}x", "", "", "", "")
        t.add_row(b, "samples/s", f"{e['throughput_samples_per_s']:.0f}", "", "", "", "")
    out.print(t)
    if "backbone_flops" in result:
        g = Table(title=f"Backbones (batch {batch[0]}); a large float32 matrix product in onnxruntime "
                        f"here: {result['reference_gflops']:.0f} GFLOP/s")
        for c in ("modality", "MB", "GFLOP", "ms", "GFLOP/s"):
            g.add_column(c, justify="left" if c == "modality" else "right")
        first = result["batches"][str(batch[0])]
        for m, fl in result["backbone_flops"].items():
            g.add_row(m, f"{result['backbone_bytes'][m] / 2**20:.1f}", f"{fl / 1e9:.3f}",
                      f"{first['bare_backbone_ms'][m]['p50']:.2f}", f"{first['backbone_gflops_per_s'][m]:.1f}")
        out.print(g)
    mem = result.get("runtime_memory_mb")
    out.print(f"pack {result['pack_kb']} KB; swap (validate + warm + switch) p50 {result['swap_ms']['p50']:.0f} ms"
              + (f"; runtime resident {mem['rss_mb']:.0f} MB (peak {mem['peak_rss_mb']:.0f} MB)" if mem else ""))
    out.print(f"results: {out_file}")


@bench_app.command("swap")
@user_errors
def bench_swap(
    workspace: Path = typer.Option(DEFAULT_WORKSPACE, "--workspace", "-w"),
    threads: int = typer.Option(4, min=1, help="Request threads calling predict nonstop (batch 1)."),
    swaps: int = typer.Option(1000, min=1, help="Swaps, alternating between the last two packs."),
    baseline_seconds: float = typer.Option(5.0, min=0.5, help="Requests with no swap first, as the reference."),
    provider: Optional[str] = typer.Option(None, help="cpu, cuda or tensorrt (default: best available)."),
    session_threads: int = typer.Option(0, help="Threads per onnxruntime session (0: the runtime's default)."),
    swap_nice: Optional[int] = typer.Option(None, min=-20, max=19, help="Niceness change of the thread that "
                                            "loads packs (positive: swaps yield to requests; negative needs "
                                            "CAP_SYS_NICE). Default: $MMCL_EDGE_SWAP_NICE, else 0."),
    out_file: Path = typer.Option(Path("bench-swap.json"), "--out", help="Where the JSON result goes."),
):
    """Hot swaps under load: swap time (validate + warm + switch) and request latency with and
    without swaps, failed requests. Needs a workspace with at least two packs.

    JSON: swap_ms, swap_parts_ms.{verify, session, warmup, switch}, request_ms.{baseline, swapping},
    request_p99_ratio, requests, failed_requests, answers_from_other_packs, swaps_done, swaps_rejected,
    swap_nice.
    """
    from mmcl_edge.cli.progress import progress_bar
    from mmcl_edge.runtime import Runtime
    from mmcl_edge.runtime.latency import example_inputs, measure_swaps, servable_packs, workspace_test_samples
    from mmcl_edge.runtime.layout import resolve_root

    root = resolve_root(workspace)
    if not (root / "workspace.json").is_file():
        raise WorkspaceError(f"{root} is not a workspace (no workspace.json); create one with 'mmcl-edge learn'")
    rt = Runtime(root, providers=provider, threads=session_threads, swap_nice=swap_nice)
    packs = servable_packs(rt)
    if len(packs) < 2:
        raise WorkspaceError(f"{root} has {len(packs)} pack(s) for its backbones; swapping needs two "
                             "(learn two tasks first)")
    samples, why = workspace_test_samples(root)
    inputs = {m: s[0] for m, s in samples.items()} if samples is not None else \
        {m: v[0] for m, v in example_inputs(rt, 1).items()}
    with progress_bar(f"{swaps} swaps under {threads} request threads", total=swaps) as bar:
        result = measure_swaps(rt, packs, inputs, swaps, threads, baseline_seconds,
                               progress=lambda done, total: bar.advance())
    result.update({"workspace": str(root), "packs": [p.name for p in packs], "providers": rt.providers,
                   "inputs": "test sample" if samples is not None else "random", "swap_nice": rt.swap_nice})
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2))
    t = Table(title=f"Hot swap under {threads} request threads")
    for c in ("measure", "p50", "p99"):
        t.add_column(c, justify="left" if c == "measure" else "right")
    if result["swap_ms"]:
        t.add_row("swap ms", f"{result['swap_ms']['p50']:.1f}", f"{result['swap_ms']['p99']:.1f}")
    for k, p in result["swap_parts_ms"].items():
        t.add_row(f"  {k} ms", f"{p['p50']:.2f}", f"{p['p99']:.2f}")
    for k, p in result["request_ms"].items():
        if p:
            t.add_row(f"request ms, {k}", f"{p['p50']:.1f}", f"{p['p99']:.1f}")
    out.print(t)
    out.print(f"{result['swaps_done']} swaps, {result['swaps_rejected']} rejected; "
              f"{sum(result['requests'].values())} requests, {result['failed_requests']} failed; "
              f"request p99 during/without swaps {result.get('request_p99_ratio', float('nan')):.2f}x")
    out.print(f"results: {out_file}")



@bench_app.command("fleet")
@user_errors
def bench_fleet(
    workspace: Path = typer.Option(DEFAULT_WORKSPACE, "--workspace", "-w",
                                   help="The leader's workspace: a signed current pack and its key in WS/keys/."),
    followers: int = typer.Option(2, min=1, max=8, help="Follower hosts, each its own network namespace and folder."),
    publishes: int = typer.Option(100, min=1, help="Packs published, one after another."),
    faults: str = typer.Option("random", help="'random' (one of none, corrupt, tamper, link, leader-kill, "
                                              "follower-kill per publish) or a comma-separated list, one per publish."),
    seed: int = typer.Option(0, help="Seed of the random faults and of which follower a fault hits."),
    link_down: float = typer.Option(30.0, min=0.1, help="Seconds a 'link' fault keeps a follower's link down."),
    follow_wait: float = typer.Option(5.0, min=0.5, max=30, help="The followers' --follow-wait."),
    inputs: Optional[Path] = typer.Option(None, help="An .npz of x_<modality> arrays the clients send (default: "
                                                     "zeros, enough for vector modalities)."),
    interval: float = typer.Option(0.025, min=0.001, help="Seconds between a client's requests to its follower."),
    work: Optional[Path] = typer.Option(None, help="Folder for the followers' folders and logs (default: a new "
                                                   "temporary folder, removed afterwards)."),
    out_file: Path = typer.Option(Path("bench-fleet.json"), "--out", help="Where the JSON result goes."),
):
    """A leader and followers on network namespaces of this machine (root): publish-to-serve time, and
    publishes under faults (corrupted or tampered archives, a cut link, a killed leader or follower)."""
    import shutil
    import tempfile

    from mmcl_edge.bench.fleet import FAULTS, NamespaceError, run
    from mmcl_edge.runtime.layout import resolve_root

    root = resolve_root(workspace)
    key = root / "keys" / "signing.pub"
    if not key.is_file() or not (root / "keys" / "signing.key").is_file():
        raise WorkspaceError(f"{root} has no signing key in {root / 'keys'}; 'mmcl-edge keys new --out {root / 'keys'}' "
                             "and learn a task, so its packs are signed")
    from mmcl_edge.runtime import Runtime

    Runtime(root, providers="cpu", threads=1, trusted_keys=[key]).stop()  # the leader's pack must be signed: say so now
    chosen = None
    if faults != "random":
        chosen = [f.strip() for f in faults.split(",") if f.strip()]
        bad = sorted(set(chosen) - set(FAULTS))
        if bad:
            raise ConfigError(f"unknown faults {bad}; choose from {', '.join(FAULTS)}")
    folder = Path(tempfile.mkdtemp(prefix="mmcl-bench-fleet-")) if work is None else work
    try:
        result = run(root, folder, key, followers=followers, faults=chosen, publishes=publishes, seed=seed,
                     follow_wait=follow_wait, link_down=link_down, inputs=inputs, interval=interval,
                     say=lambda line: err.print(escape(line), highlight=False))
    except NamespaceError as exc:
        raise ConfigError(f"bench fleet needs network namespaces (run it as root): {exc}") from None
    finally:
        if work is None:
            shutil.rmtree(folder, ignore_errors=True)
    result.update({"workspace": str(root), "followers_count": followers, "link_down_s": link_down,
                   "follow_wait_s": follow_wait, "seed": seed})
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2))
    t = Table(title=f"Fleet: {followers} followers, {len(result['rows'])} publishes")
    for c in ("fault", "publishes", "publish→serve p50 (s)", "max (s)", "after fault ends, max (s)"):
        t.add_column(c, justify="left" if c == "fault" else "right")
    for f in FAULTS:
        rows = [r for r in result["rows"] if r["fault"] == f]
        if not rows:
            continue
        lat = sorted(x for r in rows for x in r["publish_to_serve_s"] if x is not None)
        aft = [x for r in rows for x in r["after_fault_s"] if x is not None]
        t.add_row(f, str(len(rows)), f"{lat[len(lat) // 2]:.2f}" if lat else "–", f"{max(lat):.2f}" if lat else "–",
                  f"{max(aft):.2f}" if aft else "–")
    out.print(t)
    s = result["summary"]
    out.print(f"converged {s['converged']}/{s['publishes']}; failed requests on followers {s['failed_requests']} "
              f"(answers while a follower was killed are not counted); versions served that were never published "
              f"{s['unpublished_versions_served']}; versions that went back {s['versions_went_back']}; "
              f"archives corrupted/tampered in transit {result['proxy']['corrupt']}/{result['proxy']['tamper']}, "
              f"downloads resumed {result['proxy']['range']}")
    out.print(f"results: {out_file}")
