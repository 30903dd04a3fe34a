import os
import signal


def mapfunc(params, dataset):
    os.kill(os.getpid(), signal.SIGKILL)
