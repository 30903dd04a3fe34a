def mapfunc(params, dataset):
    return sum(params)
