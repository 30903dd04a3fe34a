"""`Master` as a `concurrent.futures.Executor`: its calls, `Master.map`,
the stream of tasks they run as, and what the joblib backend submits.
Part of the Master (its base class), below it; above the run logic."""
