"""Draw the curves of one or more pretraining runs into one PNG, runs overlaid.

    python tools/plot_logs.py RUN [RUN ...] [--x iterations|samples] [--out plot.png]

RUN is a --tensorboard-dir (its event files are read with tensorboard's
EventAccumulator) or a text log of pretrain_emu.py (its Megatron log lines are parsed).
Panels: lm loss, l2 loss, validation lm loss, learning rate, grad norm, tokens/s; x is
the iteration or, with --x samples, the consumed samples (TensorBoard's "<tag> vs
samples" series), so runs with different batch sizes line up.
"""

from __future__ import annotations

import os
import re
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_emu.cli import ToolParser  # noqa: E402

# (panel title, TensorBoard tag, y on a log scale)
PANELS = (
    ("lm loss", "lm loss", False),
    ("l2 loss", "l2 loss", True),
    ("validation lm loss", "lm loss validation", False),
    ("learning rate", "learning-rate", False),
    ("grad norm", "grad-norm", True),
    ("tokens/s", "tokens-per-sec", False),
)
FIGSIZE, DPI = (15, 8), 100  # -> a 1500 x 800 pixel PNG

Series = dict[str, tuple[list[float], list[float]]]  # tag -> (x, y)


def read_events(run: str, x: str) -> Series:
    """Every panel's (x, y) from the event files under `run`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(run, size_guidance={"scalars": 0})  # 0: keep every point
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    if not tags:
        raise SystemExit(f"{run}: no TensorBoard event files with scalars (expected a --tensorboard-dir)")
    series = {}
    for _, tag, _ in PANELS:
        name = f"{tag} vs samples" if x == "samples" else tag
        if name in tags:
            events = accumulator.Scalars(name)
            series[tag] = ([e.step for e in events], [e.value for e in events])
    return series


TRAIN_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \| consumed samples:\s+(\d+) \|.*?learning rate: (\S+) \|"
                        r".*?lm loss: (\S+) \| l2 loss: (\S+) \| grad norm: (\S+) \| tokens/s: (\S+) \|")
VALID_LINE = re.compile(r"validation loss at iteration (\d+) \| lm loss value: (\S+) \|")


def read_text_log(path: str, x: str) -> Series:
    """Every panel's (x, y) from the Megatron log lines of a pretrain_emu.py log."""
    series: Series = {tag: ([], []) for _, tag, _ in PANELS}
    samples_at: dict[int, int] = {}
    with open(path, errors="replace") as f:
        for line in f:
            if m := TRAIN_LINE.search(line):
                iteration, consumed = int(m[1]), int(m[2])
                samples_at[iteration] = consumed
                for tag, value in zip(("learning-rate", "lm loss", "l2 loss", "grad-norm", "tokens-per-sec"), m.groups()[2:]):
                    series[tag][0].append(consumed if x == "samples" else iteration)
                    series[tag][1].append(float(value))
            elif m := VALID_LINE.search(line):
                iteration = int(m[1])
                series["lm loss validation"][0].append(samples_at.get(iteration, 0) if x == "samples" else iteration)
                series["lm loss validation"][1].append(float(m[2]))
    if not series["lm loss"][0]:
        raise SystemExit(f"{path}: no Megatron log lines ('iteration N/ M | consumed samples: ...') found")
    return series


def read_run(run: str, x: str) -> Series:
    if os.path.isdir(run):
        return read_events(run, x)
    if os.path.isfile(run):
        return read_text_log(run, x)
    raise SystemExit(f"{run}: no such run directory or log file")


def plot(runs: dict[str, Series], x: str, out: str) -> None:
    fig, axes = plt.subplots(2, 3, figsize=FIGSIZE, dpi=DPI)
    for ax, (title, tag, log_y) in zip(axes.flat, PANELS):
        for label, series in runs.items():
            if tag in series and series[tag][0]:
                xs, ys = series[tag]
                ax.plot(xs, ys, label=label, marker="o" if len(xs) < 20 else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("consumed samples" if x == "samples" else "iteration")
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)  # no bbox_inches="tight": the pixel size stays FIGSIZE x DPI
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    parser = ToolParser(description=__doc__.split("\n\n")[0],
                        example="python tools/plot_logs.py runs/tiny runs/pp2 --x samples --out runs.png")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="--tensorboard-dir or text log of a run")
    parser.add_argument("--x", choices=["iterations", "samples"], default="iterations")
    parser.add_argument("--out", default="plot.png", help="the PNG to write")
    parser.add_argument("--labels", nargs="*", default=None, help="legend names (default: the RUN paths)")
    args = parser.parse_args(argv)
    labels = args.labels or [os.path.normpath(r) for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"--labels gives {len(labels)} names for {len(args.runs)} runs")
    runs = {label: read_run(run, args.x) for label, run in zip(labels, args.runs)}
    plot(runs, args.x, args.out)
    print(f"wrote {args.out}: {', '.join(runs)} against {args.x}")
    return args.out


if __name__ == "__main__":
    sys.exit(main() and 0)
