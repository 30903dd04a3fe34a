"""examples/notebook.ipynb, executed as Jupyter runs it (nbclient, a python3
kernel, two local workers), with its outputs checked: the values its cells
print, a worker's prefixed print, and the HTML reprs of Master and RunStats.
"""

from __future__ import annotations

import base64
import math
import os
import re
import shutil
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "notebook.ipynb"


def read_notebook():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return nb


def test_notebook_is_stored_without_outputs():
    nb = read_notebook()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    assert all(c.outputs == [] and c.execution_count is None for c in code), (
        "clear the outputs of examples/notebook.ipynb before committing it"
    )
    assert nb.metadata.kernelspec.name == "python3"
    assert code[-1].source.strip() == "m.close()", (
        "the notebook must close its Master in its last cell"
    )


def stream_text(cell) -> str:
    return "".join(
        o.get("text", "")
        for o in cell.outputs
        if o.output_type == "stream" and o.name == "stdout"
    )


def html_outputs(cell) -> list[str]:
    return [
        o.data["text/html"]
        for o in cell.outputs
        if o.output_type in ("execute_result", "display_data") and "text/html" in o.data
    ]


def describe(nb) -> str:
    parts = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        outs = []
        for o in cell.outputs:
            if o.output_type == "stream":
                outs.append(f"[{o.name}] {o.text}")
            elif o.output_type == "error":
                outs.append(f"[error] {o.ename}: {o.evalue}")
            else:
                outs.append(f"[{o.output_type}] {sorted(o.get('data', {}))}")
        parts.append(f"--- cell {i}: {cell.source.splitlines()[0]!r}\n" + "".join(outs))
    return "\n".join(parts)


@pytest.mark.timeout(300)
def test_notebook_runs_on_local_workers(tmp_path, monkeypatch):
    from jupyter_client.kernelspec import NoSuchKernel
    from nbclient import NotebookClient

    # The kernel inherits this environment: the test's own QJAMFAB_HOME
    # (conftest), two local workers, and this checkout on the path.
    monkeypatch.setenv("QJAMFAB_HOSTS", "local:2")
    monkeypatch.setenv(
        "PYTHONPATH",
        os.pathsep.join(
            [str(ROOT)]
            + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
        ),
    )
    assert os.environ.get("QJAMFAB_HOME", "").startswith(str(tmp_path))

    nb = read_notebook()
    # In the notebook's own directory, as Jupyter runs it: it must leave
    # nothing there (its helper module goes to a temporary directory).
    here = NOTEBOOK.parent
    before = set(os.listdir(here))
    client = NotebookClient(
        nb,
        timeout=120,
        startup_timeout=60,
        kernel_name="python3",
        resources={"metadata": {"path": str(here)}},
    )
    try:
        client.execute()
    except NoSuchKernel as exc:
        pytest.fail(
            f"no 'python3' Jupyter kernel ({exc}): ipykernel "
            "provides one; install ipykernel in this Python "
            "(pip install -e '.[test]')"
        )
    finally:
        left = set(os.listdir(here)) - before
        for name in left:  # a failure must not leave them in the checkout
            path = here / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert not left, f"running the notebook left {sorted(left)} in {here}"
    report = describe(nb)

    code = [c for c in nb.cells if c.cell_type == "code"]
    text = "\n".join(stream_text(c) for c in code)
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, report

    # sum matrix
    found = re.search(r"^sum: (\d+) expected: (\d+)$", text, re.M)
    assert found and found[1] == found[2] == str(200 * 200 * 40001 // 2), report
    # a remote print, in the cell that ran it, prefixed by its worker
    printing = next(c for c in code if "def count_rows" in c.source)
    prefixed = re.findall(
        r"^\[(local-[01])\] (\d+) rows, the first starts "
        r"with (\d+)$",
        stream_text(printing),
        re.M,
    )
    assert prefixed, report
    assert sum(int(n) for _, n, _ in prefixed) == 200, report
    assert "rows: 200\n" in stream_text(printing), report
    # Newton's square root: a cell's function over a notebook variable, and
    # a closure
    found = re.search(r"^sqrt\(2\.0\) = ([\d.]+)$", text, re.M)
    assert found and math.isclose(float(found[1]), math.sqrt(2), rel_tol=1e-10), report
    found = re.search(r"^sqrt\(10\.0\) = ([\d.]+)$", text, re.M)
    assert found and math.isclose(float(found[1]), math.sqrt(10), rel_tol=1e-10), report
    # logistic regression with a local module's function
    found = re.search(r"^accuracy: ([\d.]+)$", text, re.M)
    assert found and float(found[1]) >= 0.9, report
    # its live loss curve: one output, updated in place (nbclient applies the
    # updates) to the last iteration's
    training = next(c for c in code if "def loss_and_gradient" in c.source)
    curves = [o for o in training.outputs if o.output_type == "display_data"]
    assert len(curves) == 1, report
    caption = re.fullmatch(
        r"iteration 100: mean log-loss ([\d.]+)", curves[0].data["text/plain"]
    )
    assert caption and 0 < float(caption[1]) < math.log(2), curves[0].data["text/plain"]
    png = base64.b64decode(curves[0].data["image/png"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n"), png[:16]

    # HTML reprs: the Master (first cell, and again at the end with its
    # last run) and the RunStats of the last run
    first = html_outputs(code[0])
    assert first, (
        "the Master cell shows no text/html: Master needs "
        "_repr_html_ (qjamfab.display.master_html)\n" + report
    )
    assert "local-0" in first[0] and "local-1" in first[0] and "local:2" in first[0], (
        report
    )
    stats_cell = next(c for c in code if c.source.strip() == "m.last_run")
    stats_html = html_outputs(stats_cell)
    assert stats_html, (
        "m.last_run shows no text/html: RunStats needs "
        "_repr_html_ (qjamfab.display.runstats_html)\n" + report
    )
    assert "RunStats" in stats_html[0], report
    assert "0 sent" in stats_html[0], stats_html[0]  # the cache at work
    master_cell = next(c for c in code[1:] if c.source.strip() == "m")
    master_html = html_outputs(master_cell)
    assert (
        master_html and "local-1" in master_html[0] and "RunStats" in master_html[0]
    ), report


@pytest.mark.timeout(120)
def test_forced_progress_bar_in_a_kernel(tmp_path, monkeypatch):
    """RunProgress(enabled=True) in Jupyter: an HTML <progress> in the
    cell's output, updated in place, blanked when the run ends."""
    from nbclient import NotebookClient
    from nbformat.v4 import new_code_cell, new_notebook

    monkeypatch.setenv(
        "PYTHONPATH",
        os.pathsep.join(
            [str(ROOT)]
            + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
        ),
    )
    nb = new_notebook(
        cells=[
            new_code_cell(
                "from qjamfab.display import RunProgress\n"
                "p = RunProgress(3, enabled=True, delay_s=0)\n"
                "p.advance(2)\n"
                "print('shown:', p.shown)"
            ),
            new_code_cell(
                "import time\n"
                "time.sleep(0.3)\n"
                "p.advance(1)\n"
                "p.close()\n"
                "print('closed:', p.shown)"
            ),
        ],
        metadata={
            "kernelspec": {
                "name": "python3",
                "language": "python",
                "display_name": "Python 3",
            }
        },
    )
    NotebookClient(
        nb,
        timeout=60,
        startup_timeout=60,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()
    first, second = nb.cells
    assert "shown: True" in stream_text(first), describe(nb)
    assert "closed: False" in stream_text(second), describe(nb)
    bars = [o for o in first.outputs if o.output_type == "display_data"]
    # nbclient applies the updates in place: the bar ends blank
    assert len(bars) == 1 and bars[0].data["text/html"] == "", describe(nb)
    assert not [o for c in nb.cells for o in c.outputs if o.output_type == "error"], (
        describe(nb)
    )
