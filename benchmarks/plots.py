"""PNG plots of a results dict (matplotlib, the `bench` extra)."""

from __future__ import annotations

import os


def write_all(results: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    written = []
    bench = results.get("benchmarks", {})
    for name, fn in (
        ("sae", sae_speedup),
        ("overhead", overhead),
        ("transfer", transfer),
        ("memory", memory),
    ):
        result = bench.get(name)
        if result and result.get("rows") and not result.get("error"):
            path = os.path.join(out_dir, f"{name}.png")
            fn(result, path, results.get("machine", {}))
            written.append(path)
    return written


def _caption(machine: dict) -> str:
    return (
        f"{machine.get('cores', '?')} cores, Python "
        f"{machine.get('python', '?')}, {machine.get('date', '')}"
    )


def sae_speedup(result: dict, path: str, machine: dict) -> None:
    import matplotlib.pyplot as plt

    from .sae import PAPER, PAPER_SIZES

    sizes = result["sizes"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for config, cells in result["rows"].items():
        xs = [n for n in sizes if str(n) in cells]
        style = "--" if config.startswith("serial") else "-"
        left.plot(
            xs, [cells[str(n)]["speedup"] for n in xs], style, marker="o", label=config
        )
        right.plot(
            xs,
            [cells[str(n)]["seconds_per_eval"] for n in xs],
            style,
            marker="o",
            label=config,
        )
    for workers in (1, 2):
        times = PAPER[workers]
        left.plot(
            PAPER_SIZES,
            [PAPER[1][i] / times[i] for i in range(3)],
            ":",
            color="gray",
            marker="x",
            label=f"qjam 2010, {workers} worker{'s' * (workers > 1)}",
        )
    left.axhline(1.85, color="red", linewidth=0.8, linestyle=":")
    left.text(
        sizes[-1],
        1.88,
        "target 1.85x (2 workers, 100k)",
        color="red",
        fontsize=8,
        ha="right",
    )
    left.set(
        xscale="log",
        xlabel="patches",
        ylabel="speed-up vs serial",
        title="Sparse autoencoder: speed-up",
    )
    right.set(
        xscale="log",
        yscale="log",
        xlabel="patches",
        ylabel="seconds per iteration",
        title="Sparse autoencoder: time per iteration",
    )
    left.legend(fontsize=7, loc="center left")
    right.legend(fontsize=7)
    fig.suptitle(_caption(machine), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def overhead(result: dict, path: str, machine: dict) -> None:
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for prefix in ("qjamfab local", "qjamfab ssh", "multiprocessing.Pool"):
        pts = sorted(
            (r["workers"], r["median_ms"], r["p99_ms"])
            for name, r in rows.items()
            if name.startswith(prefix)
        )
        if pts:
            ax.errorbar(
                [p[0] for p in pts],
                [p[1] for p in pts],
                yerr=[[0] * len(pts), [p[2] - p[1] for p in pts]],
                marker="o",
                capsize=3,
                label=f"{prefix} (median, p99)",
            )
    for name in ("paramiko echo 100 B", "local pipe echo 100 B"):
        if name in rows:
            ax.axhline(
                rows[name]["median_ms"], linestyle=":", linewidth=0.8, color="gray"
            )
            ax.text(1, rows[name]["median_ms"] * 1.05, name, fontsize=7)
    ax.axhline(0.35, color="red", linewidth=0.8, linestyle=":")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="workers",
        ylabel="ms per trivial run",
        title="Overhead of one run",
    )
    ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    ax.legend(fontsize=7)
    fig.suptitle(_caption(machine), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def transfer(result: dict, path: str, machine: dict) -> None:
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["workers"] == 1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    mib = [r["mib"] for r in rows]
    for key, label in (
        ("first_run_mb_s", "qjamfab first run"),
        ("resend_mb_s", "qjamfab re-send (no hashing)"),
        ("openssh_stream_mb_s", "OpenSSH cat (streaming)"),
    ):
        left.plot(mib, [r[key] for r in rows], marker="o", label=label)
    left.set(
        xscale="log",
        xlabel="MiB",
        ylabel="MB/s",
        title="Shipping a dataset to 1 SSH worker",
    )
    left.legend(fontsize=7)
    right.plot(mib, [r["second_run_s"] * 1e3 for r in rows], marker="o")
    right.set(
        xscale="log",
        xlabel="MiB",
        ylabel="ms",
        title="Second run (cached), median",
        ylim=(0, None),
    )
    fig.suptitle(_caption(machine), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def memory(result: dict, path: str, machine: dict) -> None:
    import matplotlib.pyplot as plt

    rows = result["rows"]
    MiB = 1 << 20
    mib = [r["mib"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(
        mib,
        [r["master"]["vm_hwm"] / MiB for r in rows],
        marker="o",
        label="master VmHWM",
    )
    ax.plot(
        mib,
        [r["master"]["peak_rss_anon"] / MiB for r in rows],
        marker="o",
        label="master anonymous peak",
    )
    names = sorted({n for r in rows for n in r["workers"]})
    for name in names:
        ax.plot(
            mib,
            [
                r["workers"][name]["vm_hwm"] / MiB
                if name in r["workers"]
                else float("nan")
                for r in rows
            ],
            marker="s",
            label=f"{name} VmHWM",
        )
    ax.plot(
        mib,
        [
            (1.3 * max(w["slice_bytes"] for w in r["workers"].values()) + 80e6) / MiB
            for r in rows
        ],
        ":",
        color="red",
        label="worker limit 1.3 x slices + 80 MB",
    )
    ax.axhline(300e6 / MiB, color="gray", linestyle=":", linewidth=0.8)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="dataset MiB",
        ylabel="MiB",
        title="Peak memory vs dataset size",
    )
    ax.legend(fontsize=7)
    fig.suptitle(_caption(machine), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
