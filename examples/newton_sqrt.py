"""Square root by Newton's method, one Master.run per iteration.

Every worker computes the Newton step from the current estimate (a job
without a dataset runs once per worker); the master averages their answers
and iterates, the shape of every iterative job qjamfab is for.

    python examples/newton_sqrt.py 123456789
"""

import argparse
import math
import sys

from qjamfab import Master


def newton_step(params, _slice):
    a, x = params
    return x - (x * x - a) / (2 * x)


def main(a: float, iterations: int = 60) -> int:
    x = max(a, 1.0)
    with Master() as master:
        for i in range(iterations):
            step = master.run(newton_step, params=(a, x)) / len(master.workers)
            if abs(step - x) <= 1e-12 * max(1.0, abs(x)):
                break
            x = step
            print(f"iteration {i + 1}: {x!r}")
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
        epilog="The hosts are $QJAMFAB_HOSTS (else local workers).",
    )
    parser.add_argument(
        "a", nargs="?", type=positive_number, default=2.0, help="the number (default 2)"
    )
    sys.exit(main(parser.parse_args().a))
