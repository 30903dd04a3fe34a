"""Job modules of the original qjam test suite, re-created.

The workers cannot import this package: every module here reaches them by
value, which is what these tests rely on.
"""
