"""stream.BatchSizer, the futures' adaptive batching: pure, no workers."""

from qjamfab.futures.stream import BatchSizer


def test_a_batch_starts_at_one_call():
    assert BatchSizer().next(waiting=10_000, workers=2) == 1


def test_short_calls_grow_the_batch_at_most_eightfold_per_task():
    sizer = BatchSizer(target_s=0.05)
    sizer.add(1, 0.0001)  # 0.1 ms a call: 500 would fill 50 ms
    assert sizer.next(waiting=10_000, workers=2) == 8
    sizer.add(8, 0.0008)
    assert sizer.next(waiting=10_000, workers=2) == 64


def test_long_calls_shrink_the_batch_at_once():
    sizer = BatchSizer(target_s=0.05)
    for _ in range(3):
        sizer.add(1, 0.0001)
    assert sizer.next(waiting=10_000, workers=2) == 500
    sizer.add(100, 150.0)  # 1.5 s a call
    assert sizer.next(waiting=10_000, workers=2) == 1


def test_each_worker_gets_a_share_of_what_waits():
    sizer = BatchSizer(target_s=0.05)
    for _ in range(4):
        sizer.add(1, 0.001)  # 1 ms a call: 50 fill a task
    assert sizer.next(waiting=40, workers=2) == 10  # not all 40 to one
    assert sizer.next(waiting=8, workers=2) == 4  # 4 ms: not worth splitting
    assert sizer.next(waiting=2, workers=2) == 1  # but one each when idle
    assert sizer.next(waiting=0, workers=2) == 1
