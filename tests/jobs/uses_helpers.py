from tests.jobs.helpers import scaled


def mapfunc(params, dataset):
    return sum(scaled(x) for x in dataset)
