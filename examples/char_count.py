"""Letter frequencies of a text file, counted on the workers.

The file's lines are the dataset; each worker counts letters in its lines
with a Counter, and Counters add. The sample text ships beside this file.

    python examples/char_count.py [path]
    python examples/char_count.py book.txt a b   # on hosts a and b
"""

import argparse
import collections
import os
import sys

from qjamfab import DataSet, Master
from qjamfab.hostspec import add_host_arguments, script_hosts

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample.txt")


def mapfunc(params, lines):
    counts = collections.Counter()
    for line in lines:
        counts.update(c for c in line.lower() if c.isalpha())
    return counts


def main(lines: list, hosts: str | list[str] | None = None) -> int:
    with Master(hosts) as master:
        counts = master.run(mapfunc, dataset=DataSet(lines))
    total = sum(counts.values())
    for letter, n in counts.most_common():
        print(f"{letter} {n:6d} {100 * n / total:5.1f}%")
    print(f"{total} letters in {len(lines)} lines")
    return 0


def text_lines(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise argparse.ArgumentTypeError(
            f"cannot read {path}: {reason}: give a UTF-8 text file"
        ) from exc
    if not lines:
        raise argparse.ArgumentTypeError(f"{path} is empty: give a file with some text")
    return lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Hosts: --hosts=a,b, or after the path (as qjam's examples "
        "took them); else $QJAMFAB_HOSTS, else local workers.",
    )
    parser.add_argument(
        "path",
        nargs="?",
        type=text_lines,
        default=SAMPLE,
        help="a UTF-8 text file (default: the sample beside this script)",
    )
    add_host_arguments(parser)
    args = parser.parse_args()
    hosts = script_hosts(parser, args)
    sys.exit(main(args.path, hosts))
