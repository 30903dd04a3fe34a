def mapfunc(params, dataset):
    return sum(params * x for x in dataset)
