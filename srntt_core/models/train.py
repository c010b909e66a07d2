"""SRNTT training with online texture swapping (no offline precompute).

Every step draws random crops (:class:`srntt_core.models.data.TrainCrops`), swaps the reference
textures into the LR layout with :func:`srntt_core.swap.texture_swap` (VGG19 relu3_1 matching,
no gradient) and updates the generator:

- ``losses="l2"``: SRNTT-l2, reconstruction (L1) only.
- ``losses="full"``: ``pretrain_steps`` reconstruction-only steps, then
  ``1 L_rec + 1e-4 L_per + 1e-6 L_adv + 1e-4 L_tex`` with a WGAN-GP critic.
- ``train_with_truth``: a second update per batch with the swapped maps replaced by the VGG
  features of the HR crop (as the original code does); ``truth_every=k`` does it every k-th step.

Runs are resumable: ``<out>/last.pt`` (generator, critic, optimizers, step, elapsed time,
torch RNG state, samples drawn) is written atomically (:mod:`srntt_core.models.checkpoint`) every
``save_every`` steps, at the end, on a time budget, and on Ctrl-C / SIGTERM; the training
samples are defined per global sample and the RNG per global step
(:mod:`srntt_core.models.distributed`), so a resumed run continues exactly where an uninterrupted one
would be, with any number of processes. Under ``torchrun`` the ranks train one model
(DistributedDataParallel; rank 0 writes the files). A resume reads ``last.pt`` with
``weights_only=True`` and checks it before use.
``<out>/loss.csv`` and ``loss.png`` log the losses; on every start the log is cut back
(atomically) to the steps of the checkpoint the run starts from, and temporary files an
interrupted save left behind are removed.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import json
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import distributed
from . import losses as L
from .checkpoint import (
    CKPT_FORMAT,
    TRAIN_STATE_KIND,
    CheckpointError,
    atomic_save,
    atomic_write,
    check_optimizer_state,
    check_state_dict,
    export_model,
    remove_partials,
    safe_load,
    validate_train_state,
)
from .discriminator import Discriminator
from .distributed import DistributedError, rank_slice
from .pairs import DEFAULT_PAIR_MIX, parse_pair_mix
from .srntt import SRNTT, validate_config

if TYPE_CHECKING:
    from .data import TrainCrops

BATCH_NORM_MODES = ("batch", "sync", "frozen")
LOG_FIELDS = ["step", "elapsed_s", "lr", "loss", "rec", "per", "adv", "tex", "d_loss", "gp", "truth_rec"]


@dataclass
class TrainConfig:
    data: list[str]
    out: str
    steps: int = 1000
    batch: int = 9
    crop: int = 160
    ref_crop: int = 160
    lr: float = 1e-4
    lr_schedule: str = "constant"  # "constant" or "cosine" (over max(step/steps, elapsed/time_budget))
    lr_floor: float = 0.05  # cosine end value, relative to lr
    warmup_steps: int = 0  # linear warm-up of the lr over the first steps (on top of the schedule)
    losses: str = "l2"  # "l2" or "full"
    pretrain_steps: int = 0
    weights: dict = field(default_factory=lambda: dict(L.LOSS_WEIGHTS))
    texture_weighting: str = "code"  # "none", "paper" (S), "code" (sigmoid(-20 S + 0.65))
    perceptual_layer: str = "relu5_1"
    perceptual_weights: str = "imagenet"
    train_with_truth: bool = False
    truth_every: int = 1
    residual: str | None = None
    model: dict = field(default_factory=dict)  # extra SRNTT(...) arguments (tests use tiny networks)
    augment: bool = False
    pair_mix: str = DEFAULT_PAIR_MIX  # reference modes of the training pairs (srntt_core.models.pairs)
    init: str | None = None  # a new run starts from these generator weights: "bundled" or a checkpoint
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    backend: str = "auto"
    save_every: int = 50
    time_budget: float | None = None  # seconds of training (summed over resumes)
    stop_at: str | None = None  # wall-clock UTC "HH:MM" or ISO time: stop and save before it
    num_threads: int | None = None
    bn_recalibrate: int = 0  # batches to re-estimate BN statistics with at the end
    export: str | None = None  # write an fp16 inference checkpoint here at the end
    progress: bool = True
    batch_norm: str = "batch"  # "batch" (per-rank statistics), "sync" (SyncBatchNorm, GPUs), "frozen"
    dist_timeout: float = distributed.DEFAULT_TIMEOUT_S  # seconds a collective waits for the other ranks
    tensorboard: bool = True  # rank 0 logs to <out>/tensorboard when TensorBoard is installed


# ---------------------------------------------------------------------------------------------
# helpers

def validate_train_config(cfg: TrainConfig) -> None:
    """Types and ranges of the numeric settings, before anything is loaded or built."""
    def integer(name: str, lo: int, hi: int, optional: bool = False) -> None:
        v = getattr(cfg, name)
        if v is None and optional:
            return
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}: expected an integer, got {type(v).__name__} {v!r}")
        if not lo <= v <= hi:
            raise ValueError(f"{name}: must be in [{lo}, {hi}], got {v}")

    integer("steps", 0, 10**9)
    integer("batch", 1, 4096)
    integer("crop", 16, 4096)
    integer("ref_crop", 16, 4096)
    integer("pretrain_steps", 0, 10**9)
    integer("warmup_steps", 0, 10**9)
    integer("truth_every", 1, 10**9)
    integer("save_every", 1, 10**9)
    integer("bn_recalibrate", 0, 10**6)
    integer("num_threads", 1, 4096, optional=True)
    integer("seed", 0, 2**31 - 1)
    for name in ("lr", "lr_floor"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
    if cfg.time_budget is not None and not (math.isfinite(cfg.time_budget) and cfg.time_budget >= 0):
        raise ValueError(f"time_budget: expected seconds >= 0, got {cfg.time_budget!r}")
    if cfg.losses not in ("l2", "full"):
        raise ValueError(f"losses: expected 'l2' or 'full', got {cfg.losses!r}")
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule: expected 'constant' or 'cosine', got {cfg.lr_schedule!r}")
    if cfg.batch_norm not in BATCH_NORM_MODES:
        raise ValueError(f"batch_norm: expected one of {BATCH_NORM_MODES}, got {cfg.batch_norm!r}")
    if cfg.batch_norm == "frozen" and cfg.bn_recalibrate:
        raise ValueError("bn_recalibrate: frozen batch norm trains with fixed running statistics; "
                         "re-estimating them would change the trained network")
    if (isinstance(cfg.dist_timeout, bool) or not isinstance(cfg.dist_timeout, (int, float))
            or not math.isfinite(cfg.dist_timeout) or cfg.dist_timeout <= 0):
        raise ValueError(f"dist_timeout: expected seconds > 0, got {cfg.dist_timeout!r}")
    if not cfg.data:
        raise ValueError("data: give at least one training folder")
    parse_pair_mix(cfg.pair_mix)
    if cfg.init is not None:
        _init_path(cfg.init)
    if not isinstance(cfg.model, dict):
        raise TypeError(f"model: expected a dict of SRNTT arguments, got {type(cfg.model).__name__}")
    validate_config({**cfg.model, "residual": cfg.residual})


def _deadline(cfg: TrainConfig, now: float) -> float | None:
    if not cfg.stop_at:
        return None
    today = dt.datetime.now(dt.timezone.utc)
    try:
        if len(cfg.stop_at) <= 5:
            hh, mm = map(int, cfg.stop_at.split(":"))
            t = today.replace(hour=hh, minute=mm, second=0, microsecond=0)
            if t < today - dt.timedelta(hours=12):
                t += dt.timedelta(days=1)
        else:
            t = dt.datetime.fromisoformat(cfg.stop_at)
            if t.tzinfo is None:
                t = t.replace(tzinfo=dt.timezone.utc)
    except ValueError as e:
        raise ValueError(f"stop_at: expected 'HH:MM' (UTC) or an ISO time, got {cfg.stop_at!r}") from e
    return now + (t - today).total_seconds()


def _init_path(init: str) -> Path:
    """The checkpoint ``init`` names ("bundled" or a path); it must be a file."""
    from .infer import BUNDLED_CHECKPOINT

    if not isinstance(init, str):
        raise TypeError(f"init: expected 'bundled' or a checkpoint path, got {type(init).__name__}")
    if not init:
        raise ValueError("init: expected 'bundled' or a checkpoint path, got an empty string")
    path = BUNDLED_CHECKPOINT if init == "bundled" else Path(init)
    if not path.is_file():
        raise FileNotFoundError(f"init: checkpoint not found: {path}")
    return path


def _load_init(cfg: TrainConfig, model: SRNTT) -> None:
    """Load the generator weights ``cfg.init`` names into ``model`` (same configuration)."""
    from .checkpoint import load_generator

    path = _init_path(cfg.init)
    init = load_generator(path)
    if init.config != model.config:
        raise ValueError(f"init: {path} is a network with {init.config}, this run builds {model.config} "
                         "(check --residual)")
    model.load_state_dict(init.state_dict())


def _lr_at(cfg: TrainConfig, step: int, elapsed: float) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    return warm * _scheduled_lr(cfg, step, elapsed)


def _scheduled_lr(cfg: TrainConfig, step: int, elapsed: float) -> float:
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule != "cosine":
        raise ValueError(f"lr_schedule: expected 'constant' or 'cosine', got {cfg.lr_schedule!r}")
    progress = step / max(cfg.steps, 1)
    if cfg.time_budget:
        progress = max(progress, elapsed / cfg.time_budget)
    progress = min(progress, 1.0)
    return cfg.lr * (cfg.lr_floor + (1 - cfg.lr_floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log rows up to ``step`` (the checkpoint a run starts from), atomically.

    Rows past it were written after that checkpoint by a run that was killed; rows that do
    not parse (a line cut by the kill) go too. The file is rewritten to a temporary file and
    renamed, so a kill during the rewrite leaves the old log.
    """
    if not path.exists():
        return
    kept = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            try:
                if int(r.get("step") or "") <= step:
                    kept.append({k: r.get(k, "") for k in LOG_FIELDS})
            except ValueError:
                continue

    def write(f):
        text = io.StringIO()
        w = csv.DictWriter(text, LOG_FIELDS)
        w.writeheader()
        w.writerows(kept)
        f.write(text.getvalue().encode())

    atomic_write(path, write)


def plot_log(csv_path: str | os.PathLike, png_path: str | os.PathLike) -> Path | None:
    """Loss chart (log scale: per step and a running mean; the lr on a second axis) with
    matplotlib; without matplotlib (the ``bench`` extra) it warns once and draws nothing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed: no loss chart (pip install matplotlib)", RuntimeWarning,
                      stacklevel=2)
        return None
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("loss")]
    steps = [int(r["step"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    fig = Figure(figsize=(8, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if rows:
        k = max(1, len(loss) // 20)
        mean = [sum(loss[max(0, i - k):i + 1]) / len(loss[max(0, i - k):i + 1]) for i in range(len(loss))]
        ax.plot(steps, loss, color="#aab", linewidth=0.6, label="loss per step")
        ax.plot(steps, mean, color="#c00", linewidth=1.5, label=f"running mean ({k + 1} steps)")
        if all(v > 0 for v in loss):
            ax.set_yscale("log")
        lr_ax = ax.twinx()
        lr_ax.plot(steps, [float(r["lr"]) for r in rows], color="#070", linewidth=1, label="lr")
        lr_ax.set_ylabel("learning rate", color="#070")
        ax.legend(loc="upper right", fontsize="small")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    fig.tight_layout()
    return atomic_write(png_path, lambda f: fig.savefig(f, format="png"))


def vgg_to_maps(extractor: nn.Module, hr: torch.Tensor) -> dict[str, torch.Tensor]:
    """'Train with truth': the maps are the VGG features of the HR itself."""
    feats = extractor(hr)
    return {k: feats[k] for k in ("relu3_1", "relu2_1", "relu1_1")}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: list[tuple[torch.Tensor, dict]]) -> None:
    """Re-estimate BN running statistics at the final weights (cumulative average over ``batches``).

    NB: with a short run at a large learning rate, the exponential running averages lag the
    weights; evaluation-mode outputs then differ from training-mode ones.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or not batches:
        return
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was = model.training
    model.train()
    for lr, maps in batches:
        model(lr, maps)
    model.train(was)
    for m, (mom, _) in zip(bns, saved, strict=True):
        m.momentum = mom


# ---------------------------------------------------------------------------------------------
# training

def train(cfg: TrainConfig, on_step: Callable[[int], None] | None = None) -> dict:
    """Train (or resume) according to ``cfg``. Returns a summary dict.

    Under ``torchrun`` (the environment of :mod:`srntt_core.models.distributed`) every rank runs this
    with the same ``cfg``: the generator (and critic) are wrapped in DistributedDataParallel,
    ``cfg.batch`` is the global batch (each rank takes ``batch / world_size`` of the same global
    samples one process would draw), and only rank 0 writes the checkpoint and the logs.

    ``on_step(step)`` is called after every completed step (tests use it to interrupt a run).
    KeyboardInterrupt / SIGTERM save ``last.pt`` at the last completed step and re-raise
    KeyboardInterrupt. A rank that fails or cannot be reached stops the others with a
    :class:`~srntt_core.models.distributed.DistributedError`.
    """
    validate_train_config(cfg)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out: {out} exists and is not a folder")
    if cfg.export is not None and Path(cfg.export).is_dir():
        raise IsADirectoryError(f"export: {cfg.export} is a folder; give a file name")
    with distributed.session(cfg.device, cfg.dist_timeout) as (ctx, device):
        rank_slice(cfg.batch, ctx)
        if cfg.batch_norm == "sync" and ctx.distributed and device.type != "cuda":
            raise ValueError("batch_norm: 'sync' (SyncBatchNorm) needs GPUs; on the CPU use 'batch' "
                             "(per-rank statistics) or 'frozen'")
        try:
            return _train(cfg, ctx, device, on_step)
        except (RuntimeError, ConnectionError) as e:
            if not ctx.distributed or isinstance(e, DistributedError):
                raise
            raise DistributedError(
                f"rank {ctx.rank} of {ctx.world_size}: the job stopped, this or another rank failed or "
                f"cannot be reached ({_first_line(e)}); run the same command again to resume from "
                f"{out / 'last.pt'}") from e


@dataclass
class _Run:
    """What the parts of a run share: settings, networks, optimizers, data and progress."""

    cfg: TrainConfig
    ctx: distributed.Context
    device: torch.device
    model: SRNTT
    opt: torch.optim.Optimizer
    extractor: nn.Module
    scaler: torch.amp.GradScaler
    critic: nn.Module | None = None
    d_opt: torch.optim.Optimizer | None = None
    perceptual: nn.Module | None = None
    nets: dict = field(default_factory=dict)  # what _generator_step uses (DDP wrappers under torchrun)
    train_critic: nn.Module | None = None
    data: TrainCrops | None = None
    sampler: distributed.GlobalSampler | None = None
    step: int = 0
    elapsed: float = 0.0
    samples: int = 0

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def ckpt_path(self) -> Path:
        return self.out / "last.pt"

    @property
    def log_path(self) -> Path:
        return self.out / "loss.csv"

    @property
    def use_amp(self) -> bool:
        return self.cfg.amp and self.device.type == "cuda"


def _train(cfg: TrainConfig, ctx: distributed.Context, device: torch.device,
           on_step: Callable[[int], None] | None) -> dict:
    state = _prepare(cfg, ctx)
    run = _build(cfg, ctx, device)
    _resume(run, state)
    stop_reason = _loop(run, on_step)
    _save(run)
    summary = {"step": run.step, "elapsed_s": run.elapsed, "stop_reason": stop_reason,
               "checkpoint": str(run.ckpt_path), "world_size": ctx.world_size, "rank": ctx.rank}
    if cfg.export and ctx.is_main:
        _export(run)
        summary["export"] = cfg.export
    # the other ranks leave once rank 0's files are complete
    ctx.barrier()
    if ctx.is_main:
        print(json.dumps(summary), file=sys.stderr)
    return summary


def _prepare(cfg: TrainConfig, ctx: distributed.Context) -> dict | None:
    """Threads, the run folder (without the partial files of an interrupted save) and the
    training state to resume from (None for a new run)."""
    out = Path(cfg.out)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for name in ("last.pt", "loss.csv", "config.json", "loss.png"):
            remove_partials(out / name)
    # every rank reads the checkpoint rank 0 has finished with (none is being written now)
    ctx.barrier()
    path = out / "last.pt"
    return _load_train_state(path, cfg) if path.exists() else None


def _build(cfg: TrainConfig, ctx: distributed.Context, device: torch.device) -> _Run:
    """New networks and optimizers (built in a fixed order from ``cfg.seed``)."""
    from .vgg import VGG19Features

    torch.manual_seed(cfg.seed)
    model = SRNTT(residual=cfg.residual, **cfg.model).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    critic = d_opt = perceptual = None
    if cfg.losses == "full":
        critic = Discriminator(cfg.crop).to(device)
        d_opt = torch.optim.Adam(critic.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
        perceptual = L.PerceptualLoss(cfg.perceptual_layer, cfg.perceptual_weights).to(device)
    extractor = VGG19Features(("relu1_1", "relu2_1", "relu3_1")).to(device)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda")
    return _Run(cfg, ctx, device, model, opt, extractor, scaler, critic, d_opt, perceptual)


def _resume(run: _Run, state: dict | None) -> None:
    """The start weights (``state``'s, ``init``'s or new), the ranks' agreement on the start
    step, the distributed wrappers, the log cut back to the start step, config.json, the data."""
    from .data import TrainCrops

    cfg, ctx, path = run.cfg, run.ctx, run.ckpt_path
    if state is None and cfg.init is not None:
        _load_init(cfg, run.model)
    if state is not None:
        _restore(state, path, run.model, run.opt, run.critic, run.d_opt, run.scaler)
        run.step, run.elapsed = state["step"], float(state["elapsed"])
        run.samples = _samples_of(state, path)
        if ctx.is_main:
            print(f"resuming {path} at step {run.step} ({run.elapsed / 60:.1f} min trained)", file=sys.stderr)
    steps_seen = ctx.gather(run.step)
    if len(set(steps_seen)) != 1:
        raise DistributedError(f"{path}: the ranks read different checkpoints (steps {steps_seen}); "
                               "the run folder must be the same shared folder for every rank")
    train_model, run.train_critic = _parallel(run.model, run.critic, cfg, ctx, run.device)
    run.nets = {"model": train_model, "opt": run.opt, "scaler": run.scaler, "critic": run.critic,
                "perceptual": run.perceptual, "extractor": run.extractor}
    if ctx.is_main:
        # the log holds exactly the steps of the checkpoint this run starts from (none for a new run)
        _truncate_log(run.log_path, run.step)
        config_text = json.dumps(dataclasses.asdict(cfg), indent=1).encode()
        atomic_write(run.out / "config.json", lambda f: f.write(config_text))
        if run.step >= cfg.steps:
            print(f"{path}: already at step {run.step} >= steps={cfg.steps}; nothing to train",
                  file=sys.stderr)
    if run.step < cfg.steps:
        run.data = TrainCrops(cfg.data, crop=cfg.crop, ref_crop=cfg.ref_crop, augment=cfg.augment,
                              pair_mix=cfg.pair_mix)
        run.sampler = distributed.GlobalSampler(len(run.data), cfg.seed)
    _, per_rank = rank_slice(cfg.batch, ctx)
    if ctx.is_main:
        print(f"train: world size {ctx.world_size} ({ctx.backend or 'one process'}, {run.device}), batch "
              f"{cfg.batch} global = {per_rank} per rank x {ctx.world_size}, batch norm {cfg.batch_norm}",
              file=sys.stderr)


def _save(run: _Run) -> None:
    """``last.pt`` (atomically) and the loss chart; rank 0 writes, the others do nothing."""
    if not run.ctx.is_main:
        return
    atomic_save({
        "format": CKPT_FORMAT, "kind": TRAIN_STATE_KIND, "step": run.step, "elapsed": run.elapsed,
        "samples": run.samples, "world_size": run.ctx.world_size,
        "train_config": dataclasses.asdict(run.cfg), "model_config": run.model.config,
        "model": run.model.state_dict(), "opt": run.opt.state_dict(),
        "critic": run.critic.state_dict() if run.critic is not None else None,
        "d_opt": run.d_opt.state_dict() if run.d_opt is not None else None,
        "scaler": run.scaler.state_dict() if run.use_amp else None,
        "rng": torch.get_rng_state(),
    }, run.ckpt_path)
    if run.log_path.exists():
        plot_log(run.log_path, run.out / "loss.png")


class _Log:
    """Rank 0's record of the steps: ``loss.csv``, the progress bar, TensorBoard."""

    def __init__(self, run: _Run):
        self.file = self.rows = self.bar = self.tb = None
        if not run.ctx.is_main:
            return
        new_log = not run.log_path.exists()
        self.file = open(run.log_path, "a", newline="")
        self.rows = csv.DictWriter(self.file, LOG_FIELDS)
        if new_log:
            self.rows.writeheader()
        if run.cfg.tensorboard and run.data is not None:
            self.tb = distributed.tensorboard_writer(run.out / "tensorboard")
        if run.cfg.progress and run.data is not None:
            from tqdm import tqdm

            self.bar = tqdm(total=run.cfg.steps, initial=run.step, desc="train", unit="step",
                            dynamic_ncols=True)

    def step(self, run: _Run, values: dict[str, float], lr: float, step_s: float) -> None:
        if self.file is None:
            return
        row = {"step": run.step, "lr": f"{lr:.3g}", "elapsed_s": f"{run.elapsed:.1f}"}
        row.update({k: f"{v:.6g}" for k, v in values.items()})
        self.rows.writerow(row)
        self.file.flush()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=row.get("loss"), lr=row["lr"])
        if self.tb is not None:
            _tensorboard_step(self.tb, run.step, values, lr, step_s)

    def saved(self, run: _Run) -> None:
        if self.tb is not None:
            _tensorboard_images(self.tb, run.step, run.model, run.data, run.cfg, run.extractor, run.device)

    def close_file(self) -> None:
        if self.file is not None and not self.file.closed:
            self.file.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.close_file()
        if self.tb is not None:
            self.tb.close()


def _loop(run: _Run, on_step: Callable[[int], None] | None) -> str:
    """Steps until ``steps``, the time budget or ``stop_at``; returns which one stopped it.
    KeyboardInterrupt / SIGTERM save the last completed step and re-raise KeyboardInterrupt."""
    cfg = run.cfg
    deadline = _deadline(cfg, time.monotonic())
    received: list[int] = []
    old_handler = None
    if hasattr(signal, "SIGTERM") and _in_main_thread():
        old_handler = signal.signal(signal.SIGTERM, lambda s, f: received.append(s))
    log = _Log(run)
    last_step_s = 0.0
    try:
        run.model.train()
        _set_bn_mode(cfg, run.model, run.critic)
        while run.step < cfg.steps:
            stop = _stop_reason(run, bool(received), deadline, last_step_s)
            if stop is not None:
                return stop
            t0 = time.monotonic()
            values, lr = _step(run)
            last_step_s = time.monotonic() - t0
            run.elapsed += last_step_s
            log.step(run, values, lr, last_step_s)
            if run.step % cfg.save_every == 0:
                _save(run)
                log.saved(run)
            if on_step is not None:
                on_step(run.step)
        return "steps"
    except KeyboardInterrupt:
        log.close_file()
        _save(run)
        if run.ctx.is_main:
            print(f"\ninterrupted: saved {run.ckpt_path} at step {run.step}; run again to resume",
                  file=sys.stderr)
        raise
    finally:
        log.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)


def _stop_reason(run: _Run, interrupted: bool, deadline: float | None, last_step_s: float) -> str | None:
    """Whether any rank must stop before the next step (all ranks agree); raises
    KeyboardInterrupt when one received SIGTERM."""
    cfg = run.cfg
    interrupted, over_budget, near_deadline = run.ctx.any([
        interrupted,
        cfg.time_budget is not None and run.elapsed + last_step_s > cfg.time_budget,
        deadline is not None and time.monotonic() + last_step_s * 1.5 + 60 > deadline,
    ])
    if interrupted:
        raise KeyboardInterrupt
    if over_budget:
        return "time_budget"
    return "stop_at" if near_deadline else None


def _step(run: _Run) -> tuple[dict[str, float], float]:
    """One global step: the next global samples, the swap, the generator update (then the
    critic's and the "train with truth" update when set); returns (losses of the global batch, lr)."""
    from .. import swap

    cfg, ctx = run.cfg, run.ctx
    offset, per_rank = rank_slice(cfg.batch, ctx)
    torch.manual_seed(distributed.step_seed(cfg.seed, run.step, ctx.rank))
    lr_img, hr, ref = (t.to(run.device) for t in run.sampler.batch(run.data, run.samples + offset, per_rank))
    lr_now = _lr_at(cfg, run.step, run.elapsed)
    for group in run.opt.param_groups:
        group["lr"] = lr_now
    with torch.no_grad():
        sw = swap.texture_swap(lr_img, ref, extractor=run.extractor, backend=cfg.backend)
    lr_in, hr_in = lr_img * 2 - 1, hr * 2 - 1
    full = cfg.losses == "full" and run.step >= cfg.pretrain_steps
    sr, loss, parts = _generator_step(run.nets, cfg, lr_in, hr_in, sw.maps, sw.weights, full, run.use_amp)
    values = {"loss": loss, **parts}
    if full:
        values.update(_critic_step(run, hr_in, sr))
    if cfg.train_with_truth and run.step % max(cfg.truth_every, 1) == 0:
        with torch.no_grad():
            truth = vgg_to_maps(run.extractor, hr)
        _, _, parts = _generator_step(run.nets, cfg, lr_in, hr_in, truth, None, full, run.use_amp)
        values["truth_rec"] = parts["rec"]
    values = ctx.mean(values)  # the losses of the global batch
    run.step += 1
    run.samples += cfg.batch
    return values, lr_now


def _critic_step(run: _Run, hr_in: torch.Tensor, sr: torch.Tensor) -> dict[str, float]:
    """One WGAN-GP critic update on the HR and the (detached) SR of this step."""
    critic = run.train_critic
    critic.train()
    _set_bn_mode(run.cfg, None, run.critic)
    d_real, d_fake = critic(hr_in), critic(sr)
    gp = L.gradient_penalty(critic, hr_in, sr, generator=None)
    d_loss = L.critic_loss(d_real, d_fake) + gp
    run.d_opt.zero_grad(set_to_none=True)
    d_loss.backward()
    run.d_opt.step()
    return {"d_loss": d_loss.item(), "gp": gp.item()}


def _export(run: _Run) -> None:
    """BN statistics re-estimated on ``bn_recalibrate`` fixed batches, then the fp16 inference
    checkpoint with the run's settings as ``meta`` (folder names only, no machine paths)."""
    from .. import swap

    cfg, model = run.cfg, run.model
    if cfg.bn_recalibrate and run.data is not None:
        batches = []
        for i in range(cfg.bn_recalibrate):
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 10_000_000 + i)
            lr_img, _, ref = (t.to(run.device) for t in run.data.sample(cfg.batch, g))
            with torch.no_grad():
                maps = swap.texture_swap(lr_img, ref, extractor=run.extractor, backend=cfg.backend).maps
            batches.append((lr_img * 2 - 1, maps))
        recalibrate_bn(model, batches)
    meta = {"steps": run.step, "train_seconds": round(run.elapsed, 1), "device": _device_name(run.device),
            "data": [Path(d).name for d in cfg.data], "batch": cfg.batch, "crop": cfg.crop,
            "ref_crop": cfg.ref_crop, "lr": cfg.lr, "lr_schedule": cfg.lr_schedule, "losses": cfg.losses,
            "train_with_truth": cfg.train_with_truth, "truth_every": cfg.truth_every,
            "bn_recalibrate": cfg.bn_recalibrate, "seed": cfg.seed, "world_size": run.ctx.world_size,
            "pair_mix": cfg.pair_mix, "warmup_steps": cfg.warmup_steps, "lr_floor": cfg.lr_floor,
            "init": None if cfg.init is None else Path(cfg.init).name}
    export_model(_plain_bn(model), cfg.export, fp16=True, meta=meta)


def _parallel(model: nn.Module, critic: nn.Module | None, cfg: TrainConfig, ctx: distributed.Context,
              device: torch.device) -> tuple[nn.Module, nn.Module | None]:
    """The modules the steps call: DistributedDataParallel wrappers (gradients all-reduced in
    backward) in a process group, the modules themselves otherwise."""
    if not ctx.distributed:
        return model, critic
    from torch.nn.parallel import DistributedDataParallel as DDP

    if cfg.batch_norm == "sync":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        critic = nn.SyncBatchNorm.convert_sync_batchnorm(critic) if critic is not None else None
    ids = [device.index] if device.type == "cuda" else None
    wrapped_critic = DDP(critic, device_ids=ids) if critic is not None else None
    # the content extractor's SRGAN tail (ContentExtractor.tail) takes no part in Ref-SR training
    return DDP(model, device_ids=ids, find_unused_parameters=True), wrapped_critic


def _plain_bn(model: nn.Module) -> nn.Module:
    """``model`` with SyncBatchNorm layers (``batch_norm="sync"``) back to BatchNorm2d for export."""
    for name, m in model.named_children():
        if isinstance(m, nn.SyncBatchNorm):
            bn = nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
            bn.load_state_dict(m.state_dict())
            setattr(model, name, bn.to(m.weight.device))
        else:
            _plain_bn(m)
    return model


def _set_bn_mode(cfg: TrainConfig, *modules: nn.Module | None) -> None:
    """``batch_norm="frozen"``: BN layers use their running statistics in training too, so a step
    does not depend on how the global batch is split over ranks (the affine terms still learn)."""
    if cfg.batch_norm != "frozen":
        return
    for module in modules:
        for m in module.modules() if module is not None else ():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _samples_of(state: dict, path: Path) -> int:
    samples = state.get("samples", state["step"] * state["train_config"].get("batch", 1))
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise CheckpointError(f"{path}: not a valid training state: samples is {samples!r}")
    return samples


def _tensorboard_step(tb, step: int, values: dict[str, float], lr: float, step_s: float) -> None:
    for k, v in values.items():
        tb.add_scalar(f"loss/{k}", v, step)
    tb.add_scalar("lr", lr, step)
    tb.add_scalar("steps_per_s", 1 / max(step_s, 1e-9), step)


@torch.no_grad()
def _tensorboard_images(tb, step: int, model: nn.Module, data, cfg: TrainConfig, extractor, device) -> None:
    """A few fixed validation crops: bicubic x4 | SR | HR, side by side."""
    from .. import swap
    from .data import bicubic_up

    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 20_000_000)
    lr_img, hr, ref = (t.to(device) for t in data.sample(min(cfg.batch, 4), g))
    maps = swap.texture_swap(lr_img, ref, extractor=extractor, backend=cfg.backend).maps
    was = model.training
    model.eval()
    sr = ((model(lr_img * 2 - 1, maps) + 1) / 2).clamp(0, 1)
    model.train(was)
    _set_bn_mode(cfg, model)
    bic = torch.stack([bicubic_up(x.cpu()) for x in lr_img]).to(device)
    tb.add_images("val/bicubic|sr|hr", torch.cat([bic, sr, hr], dim=-1).cpu(), step)


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _load_train_state(path: Path, cfg: TrainConfig) -> dict:
    """Read ``last.pt`` safely and check that it can resume the run ``cfg`` describes."""
    state = safe_load(path)
    validate_train_state(state, path)
    saved_cfg = state["train_config"]
    defaults = dataclasses.asdict(TrainConfig(data=[], out=""))
    for key in ("residual", "losses", "crop", "model"):
        if saved_cfg.get(key, defaults[key]) != getattr(cfg, key):
            raise ValueError(
                f"{path}: cannot resume, it was trained with {key}={saved_cfg.get(key)!r} but "
                f"this run asks for {getattr(cfg, key)!r}; use another --out or the same settings"
            )
    return state


def _restore(state: dict, path: Path, model, opt, critic, d_opt, scaler) -> None:
    """Load a validated training state into freshly built networks, optimizers and RNG."""
    check_state_dict(state["model"], model, path, "the generator")
    check_optimizer_state(state["opt"], list(model.parameters()), path, "generator optimizer")
    if critic is not None and state.get("critic") is not None:
        check_state_dict(state["critic"], critic, path, "the critic")
        check_optimizer_state(state["d_opt"], list(critic.parameters()), path, "critic optimizer")
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if critic is not None and state.get("critic") is not None:
            critic.load_state_dict(state["critic"])
            d_opt.load_state_dict(state["d_opt"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a valid training state: {e}") from e
    if state.get("rng") is not None:
        torch.set_rng_state(state["rng"])


def _generator_step(nets: dict, cfg: TrainConfig, lr_in, hr_in, maps, weights, full: bool, use_amp: bool):
    """One generator update; returns (SR detached, total loss, {loss part: value})."""
    model, opt, scaler = nets["model"], nets["opt"], nets["scaler"]
    with torch.autocast("cuda", enabled=use_amp):
        sr = model(lr_in, maps).float()
        rec = L.reconstruction_loss(sr, hr_in)
        loss = cfg.weights["rec"] * rec
        parts = {"rec": rec}
        if full:
            parts["per"] = nets["perceptual"](sr, hr_in)
            tw = None
            if cfg.texture_weighting != "none" and weights is not None:
                tw = {k: L.texture_weights(w, cfg.texture_weighting) for k, w in weights.items()}
            parts["tex"] = L.texture_loss(nets["extractor"]((sr + 1) / 2), maps, tw)
            parts["adv"] = L.generator_adversarial_loss(nets["critic"](sr))
            loss = loss + sum(cfg.weights[k] * parts[k] for k in ("per", "tex", "adv"))
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return sr.detach(), loss.item(), {k: v.item() for k, v in parts.items()}


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s))"
