"""Sum a matrix on the workers: the seed's first example.

An n x n matrix holds a random permutation of 1..n^2, so its sum is known:
n^2 (n^2 + 1) / 2. Each worker sums its rows; the master adds the sums.

    python examples/sum_matrix.py [n]            # local workers, n=1000
    python examples/sum_matrix.py 2000 a b       # on hosts a and b
    python examples/sum_matrix.py a b            # n=1000 on a and b
    QJAMFAB_HOSTS=a,b python examples/sum_matrix.py 2000
    inv run examples/sum_matrix.py --hosts=a,b -- 2000
"""

import argparse
import sys

import numpy as np

from qjamfab import DataSet, Master
from qjamfab.hostspec import add_host_arguments, number_or_host, script_hosts


def mapfunc(params, rows):
    return int(rows.sum())


def main(n: int, hosts: str | list[str] | None = None) -> int:
    # Seeded: the same n gives the same matrix, so a second run finds its
    # slices in the workers' cache rather than leaving new ones there.
    matrix = np.random.default_rng(0).permutation(n * n).reshape(n, n) + 1
    expected = n * n * (n * n + 1) // 2
    with Master(hosts) as master:
        total = master.run(mapfunc, dataset=DataSet(matrix))
        print(f"expected sum: {expected}")
        print(f"computed sum: {total}")
        print(master.last_run)
    return 0 if total == expected else 1


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a positive integer: give the matrix's size, e.g. 1000"
        )
    return int(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Hosts: --hosts=a,b, or after the arguments (as qjam's examples "
        "took them); else $QJAMFAB_HOSTS, else local workers.",
    )
    parser.add_argument(
        "n",
        nargs="?",
        type=number_or_host(positive_int),
        default=1000,
        help="the matrix is n x n (default 1000)",
    )
    add_host_arguments(parser)
    args = parser.parse_args()
    hosts = script_hosts(parser, args)
    sys.exit(main(args.n, hosts))
