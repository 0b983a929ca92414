"""What both sweeps (hyperparameters, compression) share: Optuna's sampler, and resuming an interrupted Ray Tune
experiment."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)


def _reserved_by_this_job() -> set[str]:
    import ray

    job = ray.get_runtime_context().get_job_id()
    return {
        pg_id
        for pg_id, info in ray.util.placement_group_table().items()
        # Not only CREATED: a group a stopped trial asked for just before the end can still be PENDING then, and
        # be created after the sweep (seen in a fresh clone's tests: registered 11 s before a sweep ended, never
        # removed, holding its CPUs until the cluster stopped). Removing a pending group cancels it.
        if info.get("state") != "REMOVED" and pg_id.endswith(job)  # an id ends with its creator job's id
    }


@contextlib.contextmanager
def releasing_trials_placement_groups(stage: str) -> Iterator[None]:
    """When the sweep has ended, remove the placement groups its trials left reserved (or still waiting to be).

    Ray Train 2.60 removes a Train run's worker group from a cleaner actor that watches the run's controller;
    a trial Tune stops (ASHA) kills that controller, and the cleaner does not always remove its group (seen in
    a fresh clone's tests: one group of a stopped trial still CREATED minutes after the sweep). Once the sweep
    is over none of its trials runs, so what they reserved and this job still holds is released here.
    """
    import ray
    from ray._raylet import PlacementGroupID  # no public constructor from an id; ray's own State API does this
    from ray.util.placement_group import PlacementGroup

    before = _reserved_by_this_job()
    try:
        yield
    finally:
        # Twice: a stopped trial's controller, torn down as the sweep returns, may still register its group.
        for look in range(2):
            time.sleep(look * 2.0)
            for pg_id in sorted(_reserved_by_this_job() - before):
                log.warning("%s: removing placement group %s a finished sweep's trial left reserved", stage, pg_id)
                ray.util.remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))


def optuna_sampler(search: Literal["tpe", "random"], seed: int, startup_trials: int):
    """The sampler both sweeps propose with: independent random draws (the baseline), or TPE after
    ``startup_trials`` random ones. Seeded, so a sweep proposes the same values again."""
    import optuna

    if search == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials)


def sweep_identity(described: dict) -> str:
    """A digest of everything a sweep's trials depend on (JSON-able): an interrupted sweep is resumed only
    when this is unchanged."""
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def resumable_sweep(out: Path, trainable, identity: str, stage: str, also_clear: tuple[str, ...] = ()):
    """The interrupted sweep in ``out/sweep`` restored (Tuner.restore: finished trials are kept, unfinished
    ones resume), or None after clearing whatever is there (and ``also_clear``) when it belongs to another
    setup or cannot be restored. ``identity`` names the setup; it is stamped beside the sweep."""
    from ray import tune

    sweep, stamp = out / "sweep", out / "sweep.identity"
    if sweep.is_dir() and stamp.is_file() and stamp.read_text() == identity and tune.Tuner.can_restore(str(sweep)):
        print(f"[loom] {stage}: resuming the interrupted sweep in {sweep} (its finished trials are kept)", flush=True)
        return tune.Tuner.restore(str(sweep), trainable, resume_unfinished=True)
    for name in ("sweep", *also_clear):
        shutil.rmtree(out / name, ignore_errors=True)
    stamp.write_text(identity)
    return None


def trial_progress_callback(stage: str):
    """A Tune callback showing the stage's progress line: finished trials out of the sweep's."""
    from ray import tune

    from pipelines.progress import progress

    class TrialProgress(tune.Callback):
        """Tune runs callbacks in the driver and saves them with the sweep's state, so the bar is opened in
        ``setup``, which Tune also calls in the driver that resumes a sweep, and counts every finished
        trial, restored ones included."""

        def __init__(self):
            self.bar = None

        def __getstate__(self):
            return {"bar": None}  # the bar (and its terminal) stay with this process

        def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
            self.bar = progress(total_num_samples or num_samples or 0, stage, "trials")

        def _count(self, trials):
            if self.bar is not None:
                self.bar.n = sum(trial.status in ("TERMINATED", "ERROR") for trial in trials)
                self.bar.refresh()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._count(trials)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._count(trials)

        def on_experiment_end(self, trials, **info):
            self._count(trials)
            if self.bar is not None:
                self.bar.close()

    return TrialProgress()


def scheduler_state_callback(scheduler):
    """A Tune callback that carries ``scheduler``'s state (ASHA's rungs) through a resumed sweep.

    Ray Tune 2.60 saves the searcher's and the callbacks' state with every experiment checkpoint but never the
    scheduler's (``TuneController.save_to_dir``), so a restored sweep's ASHA would start with empty rungs: trials
    finished before the interruption would no longer count toward its cut-offs. ``tuner.pkl`` pickles the tune and
    run configs together, so the restored callback still holds the restored sweep's scheduler."""
    from ray import tune

    class SchedulerState(tune.Callback):
        def __init__(self, scheduler):
            self.scheduler = scheduler

        def get_state(self):
            return {"scheduler": dict(vars(self.scheduler))}

        def set_state(self, state):
            vars(self.scheduler).update(state["scheduler"])

    return SchedulerState(scheduler)
