"""Square root by Newton's method, one Master.run per iteration.

Every worker computes the Newton step from the current estimate (a job
without a dataset runs once per worker); the master averages their answers
and iterates, the shape of every iterative job qjamfab is for.

    python examples/newton_sqrt.py 123456789
    python examples/newton_sqrt.py 123456789 a b     # on hosts a and b
"""

import argparse
import math
import sys

from qjamfab import Master
from qjamfab.hostspec import add_host_arguments, number_or_host, script_hosts


def newton_step(params, _slice):
    a, x = params
    return x - (x * x - a) / (2 * x)


def main(a: float, hosts: str | list[str] | None = None, iterations: int = 60) -> int:
    x = max(a, 1.0)
    with Master(hosts) as master:
        for i in range(iterations):
            step = master.run(newton_step, params=(a, x)) / len(master.workers)
            if abs(step - x) <= 1e-12 * max(1.0, abs(x)):
                break
            x = step
            print(f"iteration {i + 1}: {x!r}")
        print(master.last_run)
    print(f"sqrt({a!r}) ~= {x!r} (math.sqrt: {math.sqrt(a)!r})")
    return 0 if math.isclose(x, math.sqrt(a), rel_tol=1e-9) else 1


def positive_number(text: str) -> float:
    try:
        a = float(text)
    except ValueError:
        a = math.nan
    if not a > 0 or math.isinf(a):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a positive number: give the number whose square "
            f"root to find, e.g. 2"
        )
    return a


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Hosts: --hosts=a,b, or after the arguments (as qjam's examples "
        "took them); else $QJAMFAB_HOSTS, else local workers.",
    )
    parser.add_argument(
        "a",
        nargs="?",
        type=number_or_host(positive_number),
        default=2.0,
        help="the number (default 2)",
    )
    add_host_arguments(parser)
    args = parser.parse_args()
    hosts = script_hosts(parser, args)
    sys.exit(main(args.a, hosts))
