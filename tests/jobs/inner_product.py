import numpy as np


def mapfunc(params, dataset):
    return sum(int(np.dot(params, x)) for x in dataset)
