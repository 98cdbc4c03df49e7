"""Loss curves: the stored training metrics of fine-tuning jobs drawn as one chart.

matplotlib is the `plot` extra, imported only when a chart is drawn, so no other command
pays for it and an install without it says what to install. Everything written on the
chart came from the API: it is shortened, its control characters are spelled out, and
matplotlib is told never to read it as mathtext or TeX. Every stored point is drawn (path
simplification is off), so a chart can be checked against the rows it came from.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, select

from eventsync import reads
from eventsync.errors import ConfigError
from eventsync.models import jobs_table, metrics_table
from eventsync.output import visible

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FORMATS = ("png", "svg")
# tab10's colours, one a job: past ten, two jobs would share a colour.
MAX_JOBS = 10
# Text from the API is cut to this many characters on the chart.
MAX_LABEL = 60
INSTALL_HINT = "pip install 'eventsync[plot]'"

# matplotlib's own defaults (not the user's matplotlibrc, which may turn on TeX), with every
# vertex drawn and SVG ids that are the same from one run to the next.
_STYLE: dict[str, Any] = {
    "path.simplify": False,
    "text.usetex": False,
    "svg.fonttype": "path",
    "svg.hashsalt": "eventsync",
    "axes.grid": True,
    "grid.alpha": 0.3,
}

# Train loss is dense and noisy: thin, a little faded. Eval loss is sparse: bold, with
# white-edged markers that stand out over the train lines.
_TRAIN: dict[str, Any] = {"linestyle": "-", "linewidth": 1.1, "alpha": 0.8}
_EVAL: dict[str, Any] = {
    "linestyle": "--",
    "linewidth": 1.8,
    "marker": "o",
    "markersize": 5,
    "markeredgecolor": "white",
    "markeredgewidth": 0.8,
}

Point = tuple[int, float]


@dataclass(frozen=True)
class Curves:
    """One job's loss, (global_step, loss) in step order, and its stored record."""

    job_id: str
    # Whether eventsync has anything for the job: a record, a sync state, or metrics.
    known: bool
    # The job's fine_tune_jobs row ({} when only its state or metrics are stored).
    job: dict[str, Any] = field(default_factory=dict)
    train: list[Point] = field(default_factory=list)
    eval: list[Point] = field(default_factory=list)

    @property
    def points(self) -> int:
        return len(self.train) + len(self.eval)


def read_curves(connection: Connection, job_id: str) -> Curves:
    """The job's snapshots that have a step, split into train and eval loss; a snapshot with
    both gives a point to each. Losses that are not finite numbers are left out."""
    j = jobs_table.c
    record = connection.execute(select(jobs_table).where(j.job_id == job_id)).first()
    m = metrics_table.c
    rows = connection.execute(
        select(m.global_step, m.train_loss, m.eval_loss)
        .where(m.job_id == job_id, m.global_step.is_not(None))
        .order_by(m.global_step, m.seq)
    ).all()
    train = [(int(r.global_step), float(r.train_loss)) for r in rows if _finite(r.train_loss)]
    evals = [(int(r.global_step), float(r.eval_loss)) for r in rows if _finite(r.eval_loss)]
    known = record is not None or bool(rows) or reads.job_known(connection, job_id)
    job = dict(record._mapping) if record is not None else {}
    return Curves(job_id, known, job, train, evals)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def batch_size(job: dict[str, Any]) -> Any:
    """The column, or the API's word for it ("max") that only the raw record keeps."""
    if job.get("batch_size") is not None:
        return job["batch_size"]
    raw = job.get("raw")
    return raw.get("batch_size") if isinstance(raw, dict) else None


def describe(curves: Curves) -> str:
    """The job id and the hyperparameters that tell runs apart: learning rate, epochs, LoRA
    rank (for LoRA jobs), batch size."""
    job = curves.job
    parts = []
    if job.get("learning_rate") is not None:
        parts.append(f"lr {rate(job['learning_rate'])}")
    if job.get("n_epochs") is not None:
        parts.append(f"{job['n_epochs']} epochs")
    lora = str(job.get("training_type") or "").lower() == "lora"
    if job.get("lora_r") is not None and (lora or job.get("training_type") is None):
        parts.append(f"LoRA r {job['lora_r']}")
    if (size := batch_size(job)) is not None:
        parts.append(f"batch {size}")
    name = short(curves.job_id)
    return f"{name}: {', '.join(short(str(p)) for p in parts)}" if parts else name


def rate(value: float) -> str:
    """A learning rate as people write one, so a sweep's labels line up: 1e-5, 3e-5, 1e-4."""
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def short(text: str, limit: int = MAX_LABEL) -> str:
    """Text from outside as a chart shows it: one line, controls spelled out, cut to `limit`."""
    text = visible(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def line_id(kind: str, index: int) -> str:
    """The SVG id of a line, `train-0` or `eval-0`: its kind and its job's place in the list."""
    return f"{kind}-{index}"


def draw(jobs: Sequence[Curves], *, fmt: str, dpi: int = 150) -> bytes:
    """The jobs' loss curves on one chart, as PNG or SVG bytes: one colour a job, train loss
    solid, eval loss dashed with markers. Each line's SVG id is `line_id`'s. The legend has
    a line a job, under the chart, which grows taller to hold it."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    require_matplotlib()
    import matplotlib
    import matplotlib.style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    with matplotlib.style.context(["default", _STYLE]), warnings.catch_warnings():
        # A character the bundled font lacks is drawn as a box, not worth a warning.
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font")
        figure = Figure(figsize=(10.0, 4.8 + 0.3 * len(jobs)), dpi=dpi, layout="constrained")
        # Agg, given to the figure itself: pyplot and its choice of a GUI backend stay out.
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        colours = matplotlib.color_sequences["tab10"]
        # Every train line first: the sparser eval lines are drawn over them, never under.
        for index, curves in enumerate(jobs):
            colour = colours[index % len(colours)]
            _line(axes, curves.train, line_id("train", index), color=colour, **_TRAIN)
        for index, curves in enumerate(jobs):
            colour = colours[index % len(colours)]
            _line(axes, curves.eval, line_id("eval", index), color=colour, **_EVAL)
        axes.set_xlabel("step (global_step)")
        axes.set_ylabel("loss")
        axes.set_title(_title(jobs), parse_math=False)
        kinds = [
            Line2D([], [], color="0.35", label="train loss", **_TRAIN),
            Line2D([], [], color="0.35", label="eval loss", **_EVAL),
        ]
        axes.legend(handles=kinds, loc="upper right", fontsize="small")
        names = [
            Line2D([], [], color=colours[i % len(colours)], linewidth=3, label=describe(c))
            for i, c in enumerate(jobs)
        ]
        # One column: Together's job ids are 39 characters, and two columns of them overflow.
        legend = figure.legend(handles=names, loc="outside lower center")
        for text in legend.get_texts():
            text.set_parse_math(False)
        return _save(figure, fmt)


def _line(axes: Axes, points: list[Point], gid: str, **style: Any) -> None:
    if not points:
        return
    steps, losses = zip(*points, strict=True)
    (line,) = axes.plot(steps, losses, **style)
    line.set_gid(gid)


def _title(jobs: Sequence[Curves]) -> str:
    models = {str(c.job.get("model")) for c in jobs if c.job.get("model")}
    title = "Loss by step" if len(jobs) > 1 else f"Loss by step: {short(jobs[0].job_id)}"
    return f"{title}\n{short(models.pop())}" if len(models) == 1 else title


def _save(figure: Figure, fmt: str) -> bytes:
    buffer = io.BytesIO()
    # No metadata in an SVG: no date, so the same rows give the same file, and no RDF block
    # of URLs in a page that must refer to nothing outside itself.
    metadata = dict.fromkeys(("Creator", "Date", "Format", "Type")) if fmt == "svg" else None
    figure.savefig(buffer, format=fmt, metadata=metadata)
    return buffer.getvalue()


def require_matplotlib() -> None:
    """ConfigError, naming the extra to install, when matplotlib can't be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"drawing needs matplotlib, which is not installed: {INSTALL_HINT}"
        ) from None
