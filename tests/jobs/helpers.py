"""A local module the workers cannot import: reaches them by value."""

SCALE = 10


def scaled(x):
    return SCALE * x
