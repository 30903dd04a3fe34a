"""Invoke tasks for qjamfab: ``inv --list``, ``inv bootstrap --hosts=a,b``.

The tasks live in `qjamfab.tasks` (the same Collection serves ``fab`` through
fabfile.py and the installed ``qjamfab`` program).
"""

from qjamfab.tasks import ns  # noqa: F401
