"""The sweep's progress callback survives Tune saving it with the sweep's state."""

from __future__ import annotations

import io
import pickle


def test_trial_progress_pickles_without_its_bar():
    import cloudpickle

    from pipelines.progress import progress
    from tune.stage import _trial_progress_callback

    bar = progress(2, "tune", "trials")
    bar.fp = io.StringIO()  # like pytest's captured stdout: a stream that cannot be pickled with the bar
    callback = _trial_progress_callback()(bar)
    restored = pickle.loads(cloudpickle.dumps(callback))
    assert restored.bar is None
    restored.on_trial_complete(0, [], None)  # a restored sweep's callback has no bar to move, and does not fail
    callback.on_trial_complete(0, [], None)
    assert bar.n == 1
    bar.close()
