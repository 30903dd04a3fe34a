import sys


def mapfunc(params, dataset):
    sys.stderr.write("about to exit\n")
    sys.exit(3)
