"""The Ray Train ``TorchTrainer`` over a run's packed shards, shared by the train and tune stages.

Kept apart from ``stage.py`` (the train stage's entry) so that the tune stage builds its
trials from the same trainer without importing another stage's entry point.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from pipelines.artifacts import DataOutputs
from pipelines.datasets import read_parquet
from pipelines.runs import RunDir
from pipelines.train.config import TrainConfig
from pipelines.train.loop import FINAL_EXPORT_MARKER, train_loop_per_worker

log = logging.getLogger(__name__)


def check_same_tokenizer(model_dir: Path, tokenizer_dir: Path) -> None:
    """Packed shards are token ids: a model continuing on them must have the tokenizer that made them."""
    from pipelines.model.tokenizer import load_tokenizer

    if load_tokenizer(model_dir).get_vocab() != load_tokenizer(tokenizer_dir).get_vocab():
        raise ValueError(
            f"train.init_from {model_dir} has another tokenizer than the one that packed the data ({tokenizer_dir}); "
            f"set data.tokenizer_path={model_dir} and rerun the data stage (--force), or fine-tune with train.sft"
        )


def ledger_path(storage_path: Path, name: str) -> Path:
    """Where a run's sample ledger (``train.sample_ledger``) is written: next to Ray Train's run directory."""
    return Path(storage_path) / f"{name}.ledger.jsonl"


def build_trainer(
    config: TrainConfig,
    run: RunDir,
    seed: int,
    storage_path: Path,
    name: str,
    callbacks: list[Any] | None = None,
    bounded_wait: bool = False,
):
    """A TorchTrainer over the run's packed shards (shared by the train and tune stages).

    ``bounded_wait``: the caller runs ``fit`` inside :func:`while_fitting`, which bounds the wait for
    room by ``train.wait_for_nodes_s``; only then is Ray Train told to make one start attempt, not one a minute.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    if config.sft is not None:
        from pipelines.train.sft import sft_datasets

        tokenizer_dir, seq_len = str(config.init_from), config.sft.seq_len
        train, val, rejects = sft_datasets(config.sft, tokenizer_dir)
        datasets = {"train": train, **({"val": val} if val is not None else {})}
        rejected = rejects.count()
        if rejected:
            log.warning("train.sft: %d lines rejected, kept with reasons in %s", rejected, storage_path / "sft_rejects")
            rejects.write_parquet(str(storage_path / "sft_rejects"))
    else:
        data = DataOutputs.of(run)
        if config.init_from is not None:
            check_same_tokenizer(Path(config.init_from), data.tokenizer)
        if config.distill is not None:
            check_same_tokenizer(Path(config.distill.teacher), data.tokenizer)
        tokenizer_dir = str(config.init_from or data.tokenizer)
        seq_len = data.seq_len
        datasets = {"train": read_parquet(str(data.train))}
        if data.has_val:
            datasets["val"] = read_parquet(str(data.val))
    has_val = "val" in datasets
    train_rows = datasets["train"].count()  # parquet: from the files' metadata
    if train_rows < config.effective_global_batch_size:  # before any worker starts, rather than in each
        raise ValueError(
            f"the training data holds {train_rows} sequences, fewer than one global batch "
            f"({config.effective_global_batch_size}); add data or lower train.micro_batch_size or "
            "train.gradient_accumulation_steps"
        )
    execution = ray.train.DataConfig.default_ingest_options()
    execution.preserve_order = True  # the same order after a restart, so the data position means something
    # Not split by Ray: every worker streams all rows in order and keeps its own micro-batches
    # (see loop._batches), which makes the data position exact across restarts.
    data_config = ray.train.DataConfig(datasets_to_split=[], execution_options=execution)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": config.model_dump(mode="json"),
            "seed": seed,
            "tokenizer_dir": tokenizer_dir,
            "seq_len": seq_len,
            "has_val": has_val,
            "train_rows": train_rows,
            "ledger": str(ledger_path(storage_path, name)) if config.sample_ledger else None,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker},
            placement_strategy=config.placement_strategy,
            elastic_resize_monitor_interval_s=config.resize_check_s,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage_path),
            failure_config=ray.train.FailureConfig(
                max_failures=config.max_failures,
                # One start attempt bounded by wait_for_nodes_s (while_fitting), not one a minute forever.
                **({"controller_failure_limit": 0} if bounded_wait and config.wait_for_nodes_s is not None else {}),
            ),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.num_checkpoints_to_keep),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=data_config,
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
    )


@contextmanager
def while_fitting(config: TrainConfig, stop_when_lost: bool = True) -> Iterator[None]:
    """What every ``trainer.fit()`` of Loom runs inside (the train stage, sweep trials, distillation runs): the bounded
    wait for room (:func:`worker_group_start_timeout`) and, for elastic runs, a current count of the nodes
    (:func:`fresh_node_view`)."""
    with ExitStack() as stack:
        stack.enter_context(worker_group_start_timeout(config, stop_when_lost))
        if config.elastic:
            stack.enter_context(fresh_node_view())
        yield


#: How often an elastic run asks the autoscaling coordinator to look at the cluster again (see fresh_node_view).
NODE_VIEW_REFRESH_S = 2.0


@contextmanager
def fresh_node_view(every_s: float = NODE_VIEW_REFRESH_S) -> Iterator[None]:
    """Ray Train's elastic policy counts the nodes it may use through Ray Data's autoscaling coordinator (one
    detached actor per cluster), which looks at the cluster on a 20 s tick of its own (``TICK_INTERVAL_S``, a
    constant in Ray 2.60). Between ticks a node declared dead is still counted, so the restart after a loss is sized
    for it and waits to time out, and a returning node is not counted at all. While ``fit`` runs, a thread here asks
    the coordinator for a tick on demand every ``every_s`` (``get_reserved_resources(recompute=True)``, its own API
    for callers that need a current view). Ray Train has no setting for this; tests/unit/test_train_config.py fails
    if the internals it relies on move."""
    import ray
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    coordinator = get_or_create_autoscaling_coordinator()  # the one Ray Train asks (get_if_exists)
    stop = threading.Event()

    def refresh() -> None:
        warned = False
        while not stop.wait(every_s):
            try:
                # A requester with no request of its own: the tick refreshes everyone's reservations, Train's too.
                ray.get(coordinator.get_reserved_resources.remote("loom-node-view", recompute=True), timeout=30)
            except Exception as error:  # noqa: BLE001 - a missed refresh only leaves the coordinator's own tick
                if not warned:
                    log.warning("could not refresh the cluster's node view (%s); Ray's 20 s tick still runs", error)
                    warned = True

    thread = threading.Thread(target=refresh, name="loom-node-view", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=60)


class NodesLostError(RuntimeError):
    """The workers found no room on the cluster within ``train.wait_for_nodes_s``."""


@contextmanager
def worker_group_start_timeout(config: TrainConfig, stop_when_lost: bool = True) -> Iterator[None]:
    """How long a worker group start waits to be placed on the cluster, while ``fit`` runs: Ray Train reads it from an
    environment variable and passes it on to its controller (restored after, since later stages run in the same
    process; a Tune trial's process sets its own).

    - Elastic (``num_workers: [min, max]``): ``train.elastic_start_wait_s``. A worker lost with its node is seen by
      Ray Train within a second, but the node stays listed alive until Ray's health checks fail; a start sized for
      it waits for room that will not come. Past this wait the controller decides again with the nodes then alive.
    - Fixed, with ``train.wait_for_nodes_s`` and ``stop_when_lost`` (the train stage, whose trainer was built with
      ``bounded_wait``): that bound, its timeout turned into a :class:`NodesLostError` that says what to do.
      Sweep trials and distillation runs pass ``stop_when_lost=False``: Ray Train's own wait.
    """
    if config.elastic:
        seconds: float | None = config.elastic_start_wait_s
    else:
        seconds = config.wait_for_nodes_s if stop_when_lost else None
    if seconds is None:
        yield
        return
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    name = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
    before = os.environ.get(name)
    os.environ[name] = str(seconds)
    try:
        yield
    except ControllerError as err:
        if config.elastic or not isinstance(err.controller_failure, WorkerGroupStartupTimeoutError):
            raise
        per_worker = f"{config.cpus_per_worker:g} CPU{'s' if config.cpus_per_worker != 1 else ''}"
        raise NodesLostError(
            f"training stopped: {config.num_workers} workers ({per_worker}{' and a GPU' if config.use_gpu else ''} "
            f"each, placed {config.placement_strategy}) found no room on the cluster within train.wait_for_nodes_s="
            f"{config.wait_for_nodes_s:g} s (a node was lost and did not come back, or the cluster is too small). The "
            "checkpoints are kept: run the train stage again once the nodes are back and it resumes from the last one"
        ) from err
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def copy_export(result, model_dir: Path) -> Path:
    """The Hugging Face export a finished Ray Train run reported last, copied to ``model_dir``."""
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint; see the worker logs above")
    shutil.rmtree(model_dir, ignore_errors=True)
    result.checkpoint.to_directory(str(model_dir))
    if not (model_dir / FINAL_EXPORT_MARKER).exists():
        raise RuntimeError(f"the last checkpoint {result.checkpoint.path} is not the final model export")
    (model_dir / FINAL_EXPORT_MARKER).unlink()
    return model_dir
