"""qjamfab's tasks through Fabric's CLI: ``fab -H a,b,c bootstrap``.

The same Collection as ``inv`` and ``qjamfab`` (`qjamfab.cli.tasks`). Fabric
calls a task once per ``-H`` host; the first call acts on all of them in
parallel and the rest do nothing, so ``fab -H a,b,c -S ssh_config status``
prints one table. ``-S/--ssh-config`` is honoured; a task's own ``--hosts``
wins over ``-H``. Under fab, give script arguments to ``run`` in one quoted
string (``fab -H a,b run "examples/sum_matrix.py 200"``): Fabric treats the
words after ``--`` as a shell command for the hosts (and fails on them
with a task: this file makes that failure a one-line hint).
"""

import sys

from qjamfab.cli import suggest_nearest_names
from qjamfab.cli.tasks import ns  # noqa: F401
from qjamfab.cli.tasks_run import fab_hint_excepthook

sys.excepthook = fab_hint_excepthook(sys.excepthook)
suggest_nearest_names()  # fab statsu: "did you mean 'status'?"
