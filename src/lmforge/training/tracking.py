"""Experiment tracking: the ``--logger`` option every training recipe shares, and the backends it names.

``metrics.jsonl`` and ``loss.png`` (``run.py`` ``MetricsLog``) are always written; ``--logger`` adds one or more
of (comma-separated, e.g. ``--logger csv,tensorboard``; YAML ``logger: [csv, tensorboard]``):

- ``csv``: ``OUT/metrics.csv``, one row per logged event, the columns the union of every key seen so far
  (``step`` first). A row with only known keys is appended; a row bringing a new key rewrites the file
  atomically with the grown header (the older rows get empty cells there), so the header always names every
  column and a reader never sees a half-written header.
- ``tensorboard``: event files under ``OUT/tb`` (``torch.utils.tensorboard``; needs ``pip install tensorboard``),
  one scalar per numeric key at the row's step, flushed after every row.
- ``wandb``: Weights & Biases in offline mode (``mode="offline"``, files under ``OUT/wandb``; ``wandb sync``
  uploads them later); project ``$WANDB_PROJECT`` or ``lmforge``. Needs ``pip install wandb``.
- ``mlflow``: an MLflow file store at ``file:OUT/mlruns`` (experiment ``lmforge``, one run per training run,
  the run configuration as parameters); ``mlflow ui --backend-store-uri OUT/mlruns`` shows it. Needs
  ``pip install mlflow-skinny`` (or ``mlflow``); MLflow 3 refuses file stores unless ``MLFLOW_ALLOW_FILE_STORE``
  is true, so a run with this logger sets it (when unset) for its process.

Every backend is a ``Tracker`` (``log(row)``, ``close()``) made by ``open_trackers``; only numbers are sent to
tensorboard, wandb and mlflow (PPO's logged sample text is left to ``metrics.jsonl``). Their packages are
imported only when a run asks for them, and a missing one is an ``LmforgeError`` naming the pip package,
raised by ``check_available``: on the command line as soon as the flags are read (``cli/options.py``), before
the output folder is claimed or a model loads; from Python when the run's ``RunDir`` is made. On resume the CSV
is rebuilt from the rows ``metrics.jsonl`` keeps, TensorBoard purges the events after the checkpoint's step, and
wandb/mlflow start a new run. Under data parallelism only rank 0 tracks (``MetricsLog(writes=False)`` opens nothing).

This module imports neither torch nor any backend at import time, so building the command line stays fast.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from lmforge.errors import LmforgeError
from lmforge.io import write_text_atomic
from lmforge.recipe_config import option

LOGGERS = ("csv", "tensorboard", "wandb", "mlflow")
# the module each backend imports, and what to install when it is missing
_NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
          "mlflow": ("mlflow", "mlflow-skinny")}


@dataclass(kw_only=True)
class Tracking:
    """Where the training metrics go besides metrics.jsonl and loss.png (a recipe config inherits this)."""

    logger: tuple[Literal["csv", "tensorboard", "wandb", "mlflow"], ...] = option((), sep=",", group="tracking")
    """Also log every metrics row to: csv (OUT/metrics.csv), tensorboard (OUT/tb), wandb (offline, OUT/wandb),
    mlflow (file store OUT/mlruns); comma-separated for several. metrics.jsonl and loss.png are always written."""


class Tracker(Protocol):
    """One tracking backend: gets every metrics row of the run (a dict with ``step``), then ``close()``."""

    def log(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def numbers(row: dict[str, Any]) -> dict[str, float]:
    """The finite numeric entries of ``row`` except ``step`` (bools and texts left out)."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def check_available(loggers: Sequence[str]) -> None:
    """``LmforgeError`` for an unknown backend name or one whose package is not installed (one line naming the
    pip package)."""
    for name in loggers:
        if name not in LOGGERS:
            raise LmforgeError(f"--logger {name}: unknown logger; choose from: {', '.join(LOGGERS)}")
        if name in _NEEDS:
            module, package = _NEEDS[name]
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):  # a module set to None in sys.modules, or a broken install
                found = False
            if not found:
                raise LmforgeError(f"--logger {name} needs the {package} package: pip install {package}")


def open_trackers(loggers: Sequence[str], out_dir: Path, rows: list[dict[str, Any]], *,
                  resume_step: int | None = None, run_config: dict[str, Any] | None = None) -> list[Tracker]:
    """The backends ``loggers`` names, writing under ``out_dir``; ``rows`` are the rows already logged (kept from
    the run a resume continues; the CSV starts from them), ``resume_step`` the step resumed from (None: a new
    run), ``run_config`` the run's configuration (wandb config, mlflow parameters)."""
    check_available(loggers)
    trackers: list[Tracker] = []
    try:
        for name in dict.fromkeys(loggers):  # each once, in the order given
            if name == "csv":
                trackers.append(CsvTracker(out_dir / "metrics.csv", rows))
            elif name == "tensorboard":
                trackers.append(TensorBoardTracker(out_dir / "tb", resume_step))
            elif name == "wandb":
                trackers.append(WandbTracker(out_dir, run_config or {}))
            else:
                trackers.append(MlflowTracker(out_dir / "mlruns", out_dir.name, run_config or {}))
    except BaseException:
        for t in trackers:
            t.close()
        raise
    return trackers


class CsvTracker:
    """``metrics.csv``: see the module docstring for how the header grows."""

    def __init__(self, path: Path, rows: Iterable[dict[str, Any]] = ()):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = ["step"]
        for row in rows:
            self._keep(row)
        self._rewrite()

    def _keep(self, row: dict[str, Any]) -> bool:
        """Remember ``row`` (its scalar cells); True when it brought a new column."""
        cells = {k: v for k, v in row.items() if isinstance(v, (int, float, str)) or v is None}
        new = [k for k in cells if k not in self.columns]
        self.columns += new
        self.rows.append(cells)
        return bool(new)

    def _line(self, cells: dict[str, Any]) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(["" if cells.get(c) is None else cells[c]
                                                       for c in self.columns])
        return buf.getvalue()

    def _rewrite(self) -> None:
        write_text_atomic(self.path, [self._line({c: c for c in self.columns}), *map(self._line, self.rows)])

    def log(self, row: dict[str, Any]) -> None:
        if self._keep(row):
            self._rewrite()
            return
        with open(self.path, "a", encoding="utf-8", newline="") as f:
            f.write(self._line(self.rows[-1]))
            f.flush()

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """TensorBoard event files in ``log_dir``; a resumed run first purges the events logged after its
    checkpoint (``purge_step``)."""

    def __init__(self, log_dir: Path, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=None if resume_step is None else resume_step + 1)

    def log(self, row: dict[str, Any]) -> None:
        step = int(row.get("step", 0))
        for key, value in numbers(row).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run in offline mode, its files under ``out_dir/wandb``."""

    def __init__(self, out_dir: Path, run_config: dict[str, Any]):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lmforge"), name=out_dir.name,
                              dir=str(out_dir), mode="offline", config=run_config, reinit="create_new")

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(numbers(row), step=int(row.get("step", 0)))

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """An MLflow run in the file store ``store`` (experiment ``lmforge``), through ``MlflowClient`` so that no
    global MLflow state (tracking URI, active run) is touched."""

    def __init__(self, store: Path, run_name: str, run_config: dict[str, Any]):
        # MLflow 3 keeps its file store in maintenance mode and refuses it unless this is set; a file store is what
        # an offline run needs (a database store needs SQLAlchemy, which mlflow-skinny lacks)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=store.resolve().as_uri())
        experiment = self.client.get_experiment_by_name("lmforge")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("lmforge")
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        for key, value in _flat(run_config).items():
            self.client.log_param(self.run_id, key, str(value)[:6000])

    def log(self, row: dict[str, Any]) -> None:
        step = int(row.get("step", 0))
        for key, value in numbers(row).items():
            self.client.log_metric(self.run_id, key, value, step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested configuration as ``a.b`` keys (MLflow parameters are flat)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
