"""Letter frequencies of a text file, counted on the workers.

The file's lines are the dataset; each worker counts letters in its lines
with a Counter, and Counters add. The sample text ships beside this file.

    python examples/char_count.py [path]
"""

import argparse
import collections
import os
import sys

from qjamfab import DataSet, Master

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample.txt")


def mapfunc(params, lines):
    counts = collections.Counter()
    for line in lines:
        counts.update(c for c in line.lower() if c.isalpha())
    return counts


def main(lines: list) -> int:
    with Master() as master:
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
        epilog="The hosts are $QJAMFAB_HOSTS (else local workers).",
    )
    parser.add_argument(
        "path",
        nargs="?",
        type=text_lines,
        default=SAMPLE,
        help="a UTF-8 text file (default: the sample beside this script)",
    )
    sys.exit(main(parser.parse_args().path))
