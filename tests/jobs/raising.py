def helper_that_fails(x):
    raise ValueError(f"bad value {x}")


def mapfunc(params, dataset):
    return helper_that_fails(params)
