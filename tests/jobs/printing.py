import ctypes
import os
import sys


def mapfunc(params, dataset):
    print("hello from python print")
    sys.stderr.write("hello from python stderr\n")
    os.write(1, b"hello from fd 1\n")
    libc = ctypes.CDLL(None)
    libc.printf(b"hello from C printf\n")  # left in C stdio's buffer
    return 42
