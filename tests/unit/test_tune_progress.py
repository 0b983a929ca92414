"""The sweep's progress callback survives Tune saving it with the sweep's state, and counts restored trials."""

from __future__ import annotations

import io
import pickle
from types import SimpleNamespace


def test_trial_progress_pickles_without_its_bar_and_reopens_it_on_setup():
    import cloudpickle

    from pipelines.sweeps import trial_progress_callback

    callback = trial_progress_callback("tune")
    callback.setup(num_samples=3, total_num_samples=3)
    callback.bar.fp = io.StringIO()  # like pytest's captured stdout: a stream that cannot be pickled with the bar
    restored = pickle.loads(cloudpickle.dumps(callback))
    assert restored.bar is None
    restored.on_trial_complete(0, [], None)  # before setup: nothing to move, and no failure
    # In the driver that resumes the sweep: the bar counts the trials the sweep had already finished.
    restored.setup(num_samples=3, total_num_samples=3)
    restored.bar.fp = io.StringIO()
    trials = [SimpleNamespace(status=s) for s in ("TERMINATED", "TERMINATED", "RUNNING")]
    restored.on_trial_complete(0, trials, trials[1])
    assert (restored.bar.n, restored.bar.total) == (2, 3)
    trials[2].status = "ERROR"
    restored.on_experiment_end(trials)
    assert restored.bar.n == 3
    callback.bar.close()
