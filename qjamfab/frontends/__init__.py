"""Ways in other than `Master.run`: the `concurrent.futures` Executor and
its calls, the joblib backend, and `minimize` (scipy). Above the Master."""
