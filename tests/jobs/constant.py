def mapfunc(params, dataset):
    return 42
