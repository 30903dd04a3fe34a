import os


def mapfunc(params, dataset):
    os.write(2, b"leaving with os._exit\n")
    os._exit(7)
