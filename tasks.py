"""Invoke tasks for qjamfab: ``inv --list``, ``inv bootstrap --hosts=a,b``.

The tasks live in `qjamfab.cli.tasks` (the same Collection serves ``fab`` through
fabfile.py and the installed ``qjamfab`` program).
"""

from qjamfab.cli import suggest_nearest_names
from qjamfab.cli.tasks import ns  # noqa: F401

suggest_nearest_names()  # inv statsu: "did you mean 'status'?"
