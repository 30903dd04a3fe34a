"""liveness.judge: who is gone when silent, with the test's own clock and
stand-in workers, hosts and inbox (no processes, no sleeps)."""

from qjamfab.core import liveness


class FakeLink:
    def __init__(self, agent=True, computing=False, last_seen=0.0):
        self.agent = agent
        self.alive = True
        self.last_seen = last_seen
        self._computing = computing

    def computing(self):
        return self._computing


class FakeHandle:
    def __init__(self, link, last_seen=0.0):
        self.link = link
        self.alive = True
        self.last_seen = last_seen


class FakeInbox:
    """read_available delivers what was waiting: it runs `arrive`."""

    def __init__(self, arrive=lambda: None):
        self.arrive = arrive
        self.reads = 0

    def read_available(self):
        self.reads += 1
        self.arrive()


def clock():
    return 100.0


def test_nobody_late_reads_nothing():
    link = FakeLink(last_seen=99.0)
    inbox = FakeInbox()
    silent = liveness.judge([FakeHandle(link, 99.0)], [link], 5.0, clock, inbox)
    assert silent == ([], []) and inbox.reads == 0


def test_a_worker_whose_host_answers_is_lost_alone():
    link = FakeLink(last_seen=99.0)
    worker = FakeHandle(link, last_seen=90.0)
    assert liveness.judge([worker], [], 5.0, clock, FakeInbox()) == ([worker], [])


def test_a_worker_still_computing_is_not_lost_and_counts_as_seen():
    link = FakeLink(last_seen=90.0, computing=True)
    worker = FakeHandle(link, last_seen=90.0)
    assert liveness.judge([worker], [], 5.0, clock, FakeInbox()) == ([], [])
    assert worker.last_seen == 100.0


def test_a_silent_host_is_named_once_for_all_its_workers():
    link = FakeLink(last_seen=90.0)
    workers = [FakeHandle(link, 90.0), FakeHandle(link, 91.0)]
    assert liveness.judge(workers, [link], 5.0, clock, FakeInbox()) == ([], [link])
    direct = FakeLink(agent=False, last_seen=99.0)  # a local worker's own pipe
    alone = FakeHandle(direct, 90.0)
    assert liveness.judge([alone], [], 5.0, clock, FakeInbox()) == ([], [direct])


def test_beats_waiting_unread_are_read_before_judging():
    link = FakeLink(last_seen=90.0)
    worker = FakeHandle(link, 90.0)

    def arrive():
        link.last_seen = worker.last_seen = 99.5

    inbox = FakeInbox(arrive)
    assert liveness.judge([worker], [link], 5.0, clock, inbox) == ([], [])
    assert inbox.reads == 1


def test_the_dead_are_not_judged_again():
    link = FakeLink(last_seen=99.0)
    worker = FakeHandle(link, 90.0)
    worker.alive = False
    assert liveness.judge([worker], [], 5.0, clock, FakeInbox()) == ([], [])
