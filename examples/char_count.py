"""Letter frequencies of a text file, counted on the workers.

The file's lines are the dataset; each worker counts letters in its lines
with a Counter, and Counters add. The sample text ships beside this file.

    python examples/char_count.py [path]
"""
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


def main(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    with Master() as master:
        counts = master.run(mapfunc, dataset=DataSet(lines))
    total = sum(counts.values())
    for letter, n in counts.most_common():
        print(f"{letter} {n:6d} {100 * n / total:5.1f}%")
    print(f"{total} letters in {len(lines)} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else SAMPLE))
