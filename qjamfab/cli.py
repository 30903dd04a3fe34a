"""The ``qjamfab`` program: the lifecycle tasks once qjamfab is installed.

    qjamfab --list
    qjamfab bootstrap --hosts=a,b,c
    qjamfab run examples/sum_matrix.py --hosts=a,b,c -- 2000

An `invoke.Program` around `qjamfab.tasks.ns`, so it parses and helps exactly
as ``inv`` does with the repository's tasks.py.
"""

from __future__ import annotations

from invoke import Program

from .tasks import ns
from .version import __version__

program = Program(namespace=ns, version=__version__, name="qjamfab", binary="qjamfab")


def main(argv: list[str] | None = None) -> None:
    """Run the program on argv (default: sys.argv); exits the process."""
    program.run(argv)


if __name__ == "__main__":
    main()
