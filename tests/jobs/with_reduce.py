def mapfunc(params, dataset):
    return [min(dataset), max(dataset)]


def reduce(a, b):
    return [min(a[0], b[0]), max(a[1], b[1])]
