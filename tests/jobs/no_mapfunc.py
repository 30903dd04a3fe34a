def not_a_mapfunc(params, dataset):
    return 1
