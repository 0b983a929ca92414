"""The `loom` command: one typed function per command, one dispatch table.

    loom validate RECIPE [key=value ...]
    loom data|tune|train|compress|serve RECIPE [key=value ...] [--force]
    loom run RECIPE [key=value ...] [--force] [--keep-serving]
    loom submit STAGE RECIPE [key=value ...] --address http://HEAD:8265
    loom export kuberay RECIPE [key=value ...] --image IMAGE --storage-claim PVC [--out DIR]
    loom monitor RECIPE [key=value ...] [--check]
    loom dashboards push RECIPE --grafana-url URL [--prometheus-url URL]
    loom serve promote|rollback MODEL [--address ADDR];  loom serve status [--address ADDR]

``python -m pipelines.data --config RECIPE ...`` (and the other stage modules)
call the same functions.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from cluster.output import LOG_FORMAT, Output
from cluster.recipe import DEFAULT_RECIPE, ConfigError, LoomConfig, load_config
from cluster.stages import STAGE_NAMES, STAGES

EXIT_CONFIG = 2


def cmd_validate(cfg: LoomConfig, args: argparse.Namespace) -> int:
    from cluster.chain import stage_key
    from cluster.stages import tuned_train_config
    from pipelines.runs import RunDir

    print(f"{args.recipe}: valid. run directory: {cfg.run_dir()}")
    run = RunDir(cfg.run_dir())
    done = run.completed_hash("tune")
    if cfg.tune.enabled and done is not None and done == stage_key("tune", cfg):  # this recipe's finished sweep
        _, tuned = tuned_train_config(cfg, run)
        print(f"train will use the sweep's best trial {tuned['trial_id']}: {tuned['params']}")
    return 0


def _wait_for_interrupt(url: str) -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"[loom] serving at {url} (Ctrl+C to stop)", flush=True)
    stop.wait()


def _start(cfg: LoomConfig, args: argparse.Namespace) -> Output:
    """Logging to the run's log file (the terminal gets Loom's lines and errors), then Ray."""
    from cluster.connect import connect

    output = Output(cfg.run_dir(), args.verbose)
    output.configure()
    where = connect(cfg.cluster, args.address, log_to_driver=args.verbose)
    output.after_connect(embedded=where.startswith("embedded"))
    print(f"[loom] Ray: {where}", flush=True)
    return output


def _stage_command(name: str) -> Callable[[LoomConfig, argparse.Namespace], int]:
    def command(cfg: LoomConfig, args: argparse.Namespace) -> int:
        from cluster.chain import run_stage

        if name == "eval" and args.endpoint:
            return _eval_endpoint(cfg, args)
        if name == "eval" and (args.model or args.ca_file or args.batch_size != 1):
            print("loom eval: --model, --ca-file and --batch-size go with --endpoint", file=sys.stderr)
            return EXIT_CONFIG
        output = _start(cfg, args)
        record = run_stage(name, cfg, force=args.force)
        if name == "serve":
            from serve.stage import base_url, shutdown

            _hold_or_stop(cfg, args, base_url(cfg.serve), shutdown)
        if record is not None:
            print(f"[loom] manifest: {cfg.run_dir() / 'manifest.json'}")
        print(output.where(), flush=True)
        return 0

    command.__name__ = f"cmd_{name}"
    return command


def _hold_or_stop(cfg: LoomConfig, args: argparse.Namespace, url: str, shutdown: Callable[[], None]) -> None:
    """With an embedded Ray the endpoint dies with this process: keep it up only when asked.

    On a cluster (an address given, or inside `ray job submit`) the app stays deployed.
    """
    on_cluster = bool(args.address or cfg.cluster.address or os.environ.get("RAY_ADDRESS"))
    if args.keep_serving:
        _wait_for_interrupt(url)
        shutdown()
    elif not on_cluster:
        shutdown()
    else:
        print(f"[loom] the application stays deployed at {url}", flush=True)


def _eval_endpoint(cfg: LoomConfig, args: argparse.Namespace) -> int:
    """``loom eval --endpoint URL --model ID``: the run's eval tasks through a served endpoint (no Ray needed)."""
    from cluster.report import write_report
    from pipelines.artifacts import ENDPOINT_SCORES, MissingInputError
    from pipelines.eval.endpoint import API_KEY_ENV, Endpoint, EndpointError, endpoint_problems, score_endpoint
    from pipelines.runs import RunDir

    problems = endpoint_problems(args.endpoint, args.model, args.ca_file, args.batch_size)
    key = os.environ.get(API_KEY_ENV, "")
    if not key:
        problems.append(f"{API_KEY_ENV}: set it to an API key of the endpoint (it is never read from the command line)")
    if problems:
        print("loom eval: nothing was scored.\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        return EXIT_CONFIG
    endpoint = Endpoint(url=args.endpoint, model=args.model, api_key=key, ca_file=args.ca_file)
    run = RunDir(cfg.run_dir())
    try:
        scores, out = score_endpoint(run, endpoint, cfg.eval, cfg.seed, batch_size=args.batch_size)
    except (MissingInputError, FileNotFoundError) as err:  # no data stage, or no held-out documents
        print(f"loom eval: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except EndpointError as err:
        print(f"loom eval: nothing was scored: {err}", file=sys.stderr)
        return 1
    print(f"[loom] eval through {args.endpoint} ({args.model}):", flush=True)
    for task, metrics in scores.tasks.items():
        shown = ", ".join(
            f"{metric} {score.value:.4g}" + (f" ± {score.stderr:.2g}" if score.stderr is not None else "")
            for metric, score in metrics.items()
        )
        print(f"[loom]   {task}: {shown}", flush=True)
    print(f"[loom] scores: {out / ENDPOINT_SCORES}; the harness's files: {out / 'harness'}", flush=True)
    if run.manifest()["stages"]:  # the run's report shows them beside the eval stage's own
        print(f"[loom] report: {write_report(run)}", flush=True)
    return 0


def _print_eval(run) -> None:
    """The eval table's headline: each task's lead metric, the base model against each variant."""
    from pipelines.artifacts import EvalResults

    summary = EvalResults.at(run).summary()
    models = [name for name, scores in summary.models.items() if scores.not_scored is None]
    print(f"\n[loom] eval (lm-evaluation-harness, held-out tasks): {' | '.join(models)}", flush=True)
    for task, info in summary.tasks.items():
        values = []
        for model in models:
            found = summary.headline(task, model)
            error = f" ± {found.stderr:.2g}" if found and found.stderr is not None else ""
            values.append(f"{found.value:.3g}{error}" if found else "-")
        print(
            f"[loom]   {task} {info.headline} ({info.better} is better, n={info.rows}): {' | '.join(values)}",
            flush=True,
        )
    for model, scores in summary.models.items():
        if scores.not_scored:
            print(f"[loom]   {model}: not scored ({scores.not_scored[:160]})", flush=True)


def cmd_run(cfg: LoomConfig, args: argparse.Namespace) -> int:
    from cluster.chain import run_chain
    from serve.stage import base_url, shutdown

    output = _start(cfg, args)
    run = run_chain(cfg, force=args.force)
    trained = run.manifest()["stages"].get("train", {}).get("metrics", {})
    if "initial_val_perplexity" in trained and "val_perplexity" in trained:
        print(
            f"\n[loom] held-out perplexity: {trained['initial_val_perplexity']:,.1f} before training -> "
            f"{trained['val_perplexity']:,.1f} after {trained.get('step', '?')} steps "
            f"({trained['initial_val_perplexity'] / trained['val_perplexity']:.1f}x lower)",
            flush=True,
        )
    compressed = run.manifest()["stages"].get("compress", {}).get("metrics", {})
    for name, ratios in compressed.get("variants", {}).items():
        print(
            f"[loom] compressed variant {name}: {ratios['weight_bytes']:.2f}x the base's bytes, "
            f"{ratios['perplexity']:.3f}x its perplexity, {ratios['tokens_per_s']:.2f}x its tokens/s",
            flush=True,
        )
    if draft := compressed.get("draft"):
        print(
            f"[loom] speculative decoding with {draft['variant']} as the draft: {draft['acceptance_rate']:.0%} of "
            f"its tokens accepted, {draft['tokens_per_s']:.2f}x the base's tokens/s",
            flush=True,
        )
    if run.is_complete("eval"):
        _print_eval(run)
    print(f"\n[loom] run directory: {run.root}\n[loom] manifest: {run.manifest_path}", flush=True)
    report = run.root / "report" / "index.html"
    if report.is_file():
        print(f"[loom] report: {report}", flush=True)
    print(output.where(), flush=True)
    _hold_or_stop(cfg, args, base_url(cfg.serve), shutdown)
    return 0


def cmd_submit(cfg: LoomConfig, args: argparse.Namespace) -> int:
    from cluster.submit import SubmitError, submit

    try:
        return submit(args.stage, Path(args.recipe), args.overrides, cfg, args.address, wait=not args.no_wait)
    except SubmitError as err:
        print(f"loom submit: {err}", file=sys.stderr)
        return EXIT_CONFIG


def cmd_export(cfg: LoomConfig, args: argparse.Namespace) -> int:
    """The RayJob always; the RayService once the run holds the models it serves (their paths go in it)."""
    import yaml

    from cluster.kuberay import KubeRayError, KubeRayOptions, ray_job, ray_service
    from cluster.submit import SubmitError
    from pipelines.runs import RunDir
    from serve.stage import bound_host, http_options, serve_app_args, serve_deploy_config

    options = KubeRayOptions(image=args.image, storage_claim=args.storage_claim, api_keys_secret=args.api_keys_secret)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        job = ray_job(cfg, Path(args.recipe), args.overrides, options)
    except (KubeRayError, SubmitError) as err:  # a relative storage; a recipe outside the image's repository
        print(f"loom export: {err}", file=sys.stderr)
        return EXIT_CONFIG
    (out / "rayjob.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    print(f"[loom] {out / 'rayjob.yaml'}: RayJob {job['metadata']['name']}", flush=True)
    run = RunDir(cfg.run_dir())
    try:
        app = serve_app_args(cfg.serve, run)
    except RuntimeError as err:
        print(f"[loom] no RayService yet: {err}", flush=True)
        return 0
    # Without keys (the Secret) or JWTs the endpoint stays on the pod's loopback, as `loom serve` binds it.
    host = bound_host(cfg.serve, has_keys=options.api_keys_secret is not None)
    service = ray_service(cfg, serve_deploy_config(app, http_options(cfg.serve, host)), options)
    (out / "rayservice.yaml").write_text(yaml.safe_dump(service, sort_keys=False))
    print(f"[loom] {out / 'rayservice.yaml'}: RayService {service['metadata']['name']}", flush=True)
    return 0


def cmd_monitor(cfg: LoomConfig, args: argparse.Namespace) -> int:
    from cluster.monitor import MonitorError, check_rules, run_prometheus, storage_folder, write_files

    config = cfg.monitor
    files = write_files(config, storage_folder(config, cfg.storage))
    try:
        check_rules(files)
        print(f"[loom] {files.config} and {files.rules}: checked by promtool", flush=True)
        if args.check:
            return 0
        print(
            f"[loom] Prometheus at http://{config.host}:{config.port} scraping the Ray nodes listed in "
            f"{config.ray_temp_dir} (Ctrl+C to stop)",
            flush=True,
        )
        return run_prometheus(config, files)
    except MonitorError as err:
        print(f"loom monitor: {err}", file=sys.stderr)
        return EXIT_CONFIG


def cmd_dashboards(cfg: LoomConfig, args: argparse.Namespace) -> int:
    """The credential comes from the environment only (cluster.grafana.credential_from_env), never argv."""
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaException
    from niquests.exceptions import RequestException  # grafana-client's HTTP library

    from cluster.grafana import RAY_FOLDER, GrafanaPushError, check_url, credential_from_env, push

    monitor = cfg.monitor
    ray_dir = Path(args.ray_dashboards or Path(monitor.ray_temp_dir) / "session_latest/metrics/grafana/dashboards")
    try:
        check_url(args.grafana_url)
        api = GrafanaApi.from_url(args.grafana_url, credential=credential_from_env(os.environ))
        prometheus_url = args.prometheus_url or f"http://{monitor.host}:{monitor.port}"
        summary = push(api, prometheus_url, monitor, ray_dir)
    except (GrafanaPushError, GrafanaException) as err:
        print(f"loom dashboards: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except RequestException as err:
        print(f"loom dashboards: cannot reach Grafana at {args.grafana_url}: {err}", file=sys.stderr)
        return 1
    if RAY_FOLDER[0] not in summary.folders:
        print(f"[loom] no Ray dashboards in {ray_dir} (start Ray first, or give --ray-dashboards)", flush=True)
    print(
        f"[loom] {args.grafana_url}: data source {summary.datasource} -> {prometheus_url}; "
        f"{len(summary.dashboards)} dashboards in folders {', '.join(summary.folders)}; "
        f"{len(summary.alert_rules)} alert rules",
        flush=True,
    )
    return 0


COMMANDS: dict[str, tuple[Callable[[LoomConfig, argparse.Namespace], int], str]] = {
    "validate": (cmd_validate, "check a recipe and list every problem"),
    **{name: (_stage_command(name), stage.summary) for name, stage in STAGES.items()},
    "run": (cmd_run, f"the whole chain: {', '.join(STAGE_NAMES)}"),
    "submit": (cmd_submit, "validate locally, then run a stage as a Ray job"),
    "export": (cmd_export, "write the recipe as KubeRay resources (RayJob, RayService)"),
    "dashboards": (cmd_dashboards, "push Loom's and Ray's dashboards and Loom's alert rules to Grafana"),
    "monitor": (cmd_monitor, "run Prometheus on loopback with Loom's alert rules, scraping the Ray cluster"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loom", description="Build a language model end to end on Ray.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=summary)
        if name == "submit":
            sub.add_argument("stage", choices=[*STAGE_NAMES, "run"], help="what the job runs")
        if name == "export":
            sub.add_argument("target", choices=["kuberay"], help="what to write")
        if name == "dashboards":
            sub.add_argument("action", choices=["push"], help="what to do")
        sub.add_argument("recipe", nargs="?", help=f"YAML recipe (default: {DEFAULT_RECIPE.name})")
        sub.add_argument("--config", dest="config_flag", metavar="RECIPE", help="same as the positional RECIPE")
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=3e-4")
        if name == "export":
            sub.add_argument("--image", required=True, help="image with Loom's repository at /app")
            sub.add_argument("--storage-claim", required=True, help="PVC mounted at the recipe's storage")
            sub.add_argument("--api-keys-secret", help="Secret whose 'keys' entry holds the endpoint's API keys")
            sub.add_argument("--out", default="kuberay", help="folder the manifests are written to")
        if name == "dashboards":
            sub.add_argument("--grafana-url", required=True, help="e.g. https://grafana.example.com")
            sub.add_argument("--prometheus-url", help="Prometheus as Grafana reaches it (default: monitor.host:port)")
            sub.add_argument("--ray-dashboards", help="folder of Ray's dashboards (default: Ray's session_latest)")
        if name == "monitor":
            sub.add_argument("--check", action="store_true", help="write and check the files, start nothing")
        if name == "eval":
            sub.add_argument(
                "--endpoint",
                metavar="URL",
                help="score through this OpenAI-compatible endpoint (its base, https://HOST:PORT/v1) instead of "
                "loading the models; the key from LOOM_API_KEY",
            )
            sub.add_argument("--model", help="--endpoint: the served model id to score")
            sub.add_argument("--ca-file", help="--endpoint: the CA its certificate is checked against")
            sub.add_argument(
                "--batch-size", type=int, default=1, help="--endpoint: prompts per request (its max_prompts bounds it)"
            )
        if name not in ("validate", "export", "monitor", "dashboards"):
            sub.add_argument(
                "--address",
                required=name == "submit",
                help="Ray job server (submit: http://HEAD:8265) or cluster address; default: "
                "RAY_ADDRESS, else an embedded local Ray",
            )
        if name in (*STAGE_NAMES, "run"):
            sub.add_argument("--force", action="store_true", help="redo stages even if complete")
        if name in ("serve", "run"):
            sub.add_argument("--keep-serving", action="store_true", help="keep the endpoint up until Ctrl+C")
        if name in (*STAGE_NAMES, "run"):
            sub.add_argument(
                "--verbose",
                action="store_true",
                help="show Ray's, vLLM's and DeepSpeed's logs live (else: <run>/logs/)",
            )
        if name == "submit":
            sub.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    return parser


def _split_recipe(args: argparse.Namespace) -> None:
    """``loom data train.lr=1`` has no recipe: argparse puts the override in ``recipe``."""
    if args.recipe and "=" in args.recipe and not args.recipe.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.recipe)
        args.recipe = None
    if args.config_flag and args.recipe:
        raise ConfigError(
            args.recipe, [("", f"give the recipe once (positional or --config), not both: {args.config_flag}")]
        )
    args.recipe = args.config_flag or args.recipe or str(DEFAULT_RECIPE)


def refuse_storage_inside_a_job(cfg: LoomConfig, source: str) -> None:
    """Inside `ray job submit`, the job runs in Ray's temporary unpacked copy of its working_dir: a relative
    storage would put the run there, and it would vanish with the Ray session (and the next stage's job,
    in another copy, would not find it)."""
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    if in_job and not Path(cfg.storage).is_absolute():
        raise ConfigError(
            source,
            [
                (
                    "storage",
                    f"'{cfg.storage}' is relative, and this Ray job runs in Ray's temporary copy of the working "
                    f"directory ({Path.cwd()}): the run would vanish with the Ray session. Give an absolute path "
                    "on a filesystem every node mounts (e.g. storage=/mnt/shared/loom-runs), or submit with "
                    "`loom submit`, which anchors it where you stand",
                )
            ],
        )


def stages_used(args: argparse.Namespace) -> tuple[str, ...]:
    """The stages a command runs: a recipe is checked for what they use (``loom data`` on a data-only
    recipe is not refused for a model shape only serving would trip on)."""
    command = args.stage if args.command == "submit" else args.command
    return (command,) if command in STAGES else STAGE_NAMES


CANARY_ACTIONS = ("promote", "rollback", "status")


def release_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loom serve", description="Decide a running canary release by hand (serve.models.<id>.canary)."
    )
    parser.add_argument("action", choices=CANARY_ACTIONS, help="promote: weight 100; rollback: weight 0; status")
    parser.add_argument("model", nargs="?", help="the model id whose canary is decided")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS)")
    return parser


def cmd_release(argv: list[str]) -> int:
    """``loom serve promote|rollback MODEL`` / ``loom serve status``: against the cluster the endpoint runs on."""
    import json

    from cluster.config import ClusterConfig
    from cluster.connect import connect
    from serve.stage import canary_status, decide_canary

    args = release_parser().parse_args(argv)
    if args.action != "status" and not args.model:
        print(f"loom serve {args.action}: name the model whose canary to {args.action}", file=sys.stderr)
        return EXIT_CONFIG
    import ray

    if not (ray.is_initialized() or args.address or os.environ.get("RAY_ADDRESS")):
        print(f"loom serve {args.action}: give the endpoint's cluster with --address or RAY_ADDRESS", file=sys.stderr)
        return EXIT_CONFIG
    connect(ClusterConfig(), args.address, log_to_driver=False)
    try:
        answer = canary_status() if args.action == "status" else decide_canary(args.model, args.action)
    except RuntimeError as err:
        print(f"loom serve {args.action}: {err}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)  # stage commands send it to the run's log file
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"] and argv[1:2] and argv[1] in CANARY_ACTIONS:
        return cmd_release(argv[1:])
    args = build_parser().parse_args(argv)
    handler, _ = COMMANDS[args.command]
    try:
        _split_recipe(args)
        cfg = load_config(args.recipe, args.overrides, stages=stages_used(args))
        if args.command != "validate":
            refuse_storage_inside_a_job(cfg, args.recipe)
    except ConfigError as err:
        print(f"loom {args.command}: invalid configuration, nothing was started.\n{err}", file=sys.stderr)
        return EXIT_CONFIG
    return handler(cfg, args)


if __name__ == "__main__":
    sys.exit(main())
