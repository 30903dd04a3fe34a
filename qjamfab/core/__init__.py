"""One run on the master: its plan, its task copies and their dispatch, the
policy (balancing, stragglers, re-planning, liveness), losses, and its
results on their way in (the fixed tree, spill, the data supply). Below
the Master; above the links and the data it sends."""
