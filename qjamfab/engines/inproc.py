"""The `inproc` engine: `Master("inproc:N")` is one host whose agent and N
workers are threads of this process. The agent is the real host agent
(runtime/agent.py) at the far end of a pair of pipes, as over SSH; each
worker is the real worker runtime (runtime/worker.py) at the far end of a
socketpair, as a daemon's socket. So the Master's and Run's logic
(placement, balancing, stealing, loss and re-planning, backups, the split
rule) and the agent's (results held and offered, COLLECT) are tested
through public behaviour without processes or hosts, in the spirit of
Dask's `inproc://` comm and httpx's `MockTransport`.

What differs from an SSH host: what a job prints goes straight to this
process's stdout and stderr (no capture, no `[worker]` prefix); there are
no daemon processes to claim, keep or stop (workers end with their
Master); a host of one worker keeps its agent between (no handover); and
a job acts out failures with these calls, made from inside mapfunc:

- `die(status)`: its worker ends as if its process exited with `status`
  (its socket closes; the agent says how it ended, and the Master sees
  the worker lost, with that status);
- `freeze(seconds)`: its worker stops its heartbeats and answers nothing
  for that long, as if its process were stopped (SIGSTOP); seen from
  outside it is not running, so the heartbeat deadline applies.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
import time
import traceback
from collections.abc import Sequence

from ..hostspec import HostSpec
from ..links import handshake
from ..links.transport import PipesTransport
from ..links.workers import Link
from ..runtime import HAVE_RUNTIME, secure_dir, secure_host_dir
from ..runtime.agent import Agent
from ..runtime.cache import RefCache
from ..runtime.capture import Capture
from ..runtime.daemons import Daemon
from ..runtime.serving import Channel
from ..runtime.worker import Worker
from . import Engine, EngineSettings, Host, register
from .agent_host import AgentHost

_JOIN_S = 2.0  # for a thread to end once its stream has


class _Died(BaseException):
    """Raised by die(): not an Exception, so no job error catches it."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


_workers = threading.local()  # the in-process worker a thread runs


def die(status: int = 1) -> None:
    """End the calling job's worker, as if its process exited."""
    raise _Died(status)


def freeze(seconds: float) -> None:
    """Stop the calling job's worker for `seconds`, as if stopped."""
    worker: _WorkerThread = _workers.current
    worker.runtime.heartbeats = False
    worker.frozen = True
    try:
        time.sleep(seconds)
    finally:
        worker.frozen = False
        worker.runtime.heartbeats = True


class _NoCapture(Capture):
    """A worker's output capture where there is none to make: the
    thread's output is the process's. What Worker uses of a Capture
    (path, channel, begin, end) is all it has: Capture's own __init__,
    which redirects this process's stdout and stderr, does not run."""

    path = ""
    channel = None

    def __init__(self) -> None:
        pass

    def begin(self) -> None:
        pass

    def end(self) -> None:
        pass


class _WorkerThread:
    """One worker: the worker runtime serving one end of a socketpair."""

    def __init__(self, name: str, base: str, far: socket.socket):
        self.frozen = False
        self.status: int | None = None  # its "exit status", once ended
        self.runtime = Worker(
            name, base, RefCache(os.path.join(base, "cache")), _NoCapture()
        )
        self.runtime.exit_on_hangup = False  # it would end this process
        self.thread = threading.Thread(
            target=self._serve, args=(far,), name=f"qjamfab-inproc-{name}", daemon=True
        )
        self.thread.start()

    def _serve(self, far: socket.socket) -> None:
        _workers.current = self
        try:
            self.runtime.serve(Channel(far.recv_into, far.sendmsg, far.fileno()))
            self.status = 0
        except _Died as died:
            self.status = died.status
        except OSError:  # the agent closed the socket meanwhile
            self.status = 0
        finally:
            far.close()


class _ThreadDaemon(Daemon):
    """A worker thread as the agent sees a daemon: no process, no claim."""

    def __init__(self, index: int, sock: socket.socket, worker: _WorkerThread):
        super().__init__(index, index, sock, {"pid": os.getpid(), "log": ""}, -1)
        self.worker = worker

    def running(self) -> bool:
        return self.worker.thread.is_alive() and not self.worker.frozen

    def close(self) -> None:
        self.closed = True
        self.sock.close()

    def ended(self, base: str) -> tuple[int | None, str]:
        self.worker.thread.join(_JOIN_S)  # its status is set as it ends
        return self.worker.status, ""


class _ThreadAgent(Agent):
    """The host agent, its daemons threads."""

    hands_over = False  # its daemons cannot take a stream: they are threads

    def __init__(self, label: str, base: str, master_in: int, master_out: int):
        super().__init__(base, master_in, master_out)
        self.label = label

    def start_daemons(
        self, indices: list[int], idle: float, template: dict, session: str | None
    ) -> tuple[list[tuple[Daemon, dict]], dict[int, str]]:
        attached: list[tuple[Daemon, dict]] = []
        failed: dict[int, str] = {}
        for k in indices:
            near, far = socket.socketpair()
            daemon = _ThreadDaemon(
                k, near, _WorkerThread(f"{self.label}-{k}", self.base, far)
            )
            # Its HELLO comes first, written whole.
            if not select.select([near], [], [], handshake.HANDSHAKE_TIMEOUT_S)[0]:
                daemon.close()
                failed[k] = "it did not say HELLO"
                continue
            _, _, hello, _ = daemon.reader.read()
            attached.append((daemon, hello))
        return attached, failed

    def run(self) -> None:
        """Serve until the master's stream ends, then let the workers go
        and wait for those that are not frozen to end."""
        try:
            self.serve()
        finally:
            workers = [
                d.worker for d in self.daemons.values() if isinstance(d, _ThreadDaemon)
            ]
            for daemon in list(self.daemons.values()):
                daemon.close()
            for worker in workers:
                if not worker.frozen:
                    worker.thread.join(_JOIN_S)


class _AgentThreadTransport(PipesTransport):
    """A host agent thread at the far end of two pipes, as an SSH
    session's stdin and stdout."""

    def __init__(self, label: str, base: str):
        self._failure = ""  # the agent's traceback, as a process's stderr
        to_agent, write_fd = os.pipe()
        read_fd, from_agent = os.pipe()
        super().__init__(label, read_fd, write_fd)
        os.write(from_agent, HAVE_RUNTIME)  # what the agent's boot says
        agent = _ThreadAgent(label, base, to_agent, from_agent)
        self._thread = threading.Thread(
            target=self._serve,
            args=(agent, to_agent, from_agent),
            name=f"qjamfab-inproc-agent-{label}",
            daemon=True,
        )
        self._thread.start()

    def _serve(self, agent: _ThreadAgent, to_agent: int, from_agent: int) -> None:
        try:
            agent.run()
        except Exception:
            self._failure = traceback.format_exc()
        finally:
            os.close(to_agent)
            os.close(from_agent)

    def close(self) -> None:
        # Once only: a descriptor closed twice may by then be another's.
        if self._read_fd >= 0:
            os.close(self._write_fd)
            os.close(self._read_fd)
            self._closed_fds(read=True)
        self._thread.join(2 * _JOIN_S)

    def exit_report(self, log_path: str | None) -> tuple[int | None, str]:
        self._thread.join(2 * _JOIN_S)
        return None, self._failure


class InProcessHost(AgentHost):
    """`inproc[:N]`: one host of N workers, its agent and workers threads."""

    def __init__(self, spec: HostSpec, settings: EngineSettings):
        count = spec.workers or settings.workers_per_host or os.cpu_count() or 1
        super().__init__(spec, spec.kind, count, settings)

    def open_link(self) -> Link:
        base = self.settings.base
        for path in (base, os.path.join(base, "cache")):
            secure_dir(path)
        secure_host_dir(base)
        link = Link(
            self.label,
            _AgentThreadTransport(self.label, base),
            agent=True,
            stall_timeout=self.settings.heartbeat_timeout,
        )
        handshake.start_agent(link, sys.executable)
        return link


def _make(specs: Sequence[HostSpec], settings: EngineSettings) -> list[Host]:
    return [InProcessHost(spec, settings) for spec in specs]


register(Engine("inproc", ("inproc",), _make))
