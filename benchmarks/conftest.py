"""Shared pieces of the benchmark suite (``make bench``).

- Collects ``bench_*.py`` (pytest's default only looks for ``test_*.py``).
- ``shape`` and ``features`` parameters for every benchmark that asks for them:
  relu3_1 sizes of a training crop (40x40), a CUFED5-size image (83x125, i.e. 332x500 pixels) and a
  1080p output (270x480); ``real`` features are VGG19 relu3_1 (and relu2_1, relu1_1 values) of a
  Sun80 image from the dataset folder (``data_root()``) split in two halves (the split-image
  protocol, docs/CONTRACT.md §10: one half is the target, the other the reference), ``random`` ones
  are standard normal.
- ``bench``: wraps pytest-benchmark's fixture; times with ``benchmark.pedantic``, measures peak
  memory per round (peak_memory.py) and fills ``extra_info`` (backend, shape, n_query, n_key,
  GFLOP/s, peak_mem_mb, device).
- ``SRNTT_BENCH_SHAPES=train,cufed5`` restricts the shapes (quick checks).
- The 1080p shape is partly opt-in: ``SRNTT_BENCH_LARGE=1`` runs every provider that fits there,
  ``SRNTT_BENCH_LARGE=0`` none; by default only each file's ``LARGE_DEFAULT`` cases run.
- Skipped cases and their reasons, the machine name and the load average go into the results JSON.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from peak_memory import PeakMemory

import srntt_core.swap as sw
from srntt_core.cli.machine import machine_name

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """The folder of full datasets (``images/Sun80``, ...): ``$SRNTT_DATA``, else ``../shared/data``
    beside the repository. The one place that names a default dataset folder."""
    return Path(os.environ.get("SRNTT_DATA") or REPO.parent / "shared" / "data")


IMAGE = data_root() / "images" / "Sun80" / "canal_urban_sun_bioizsmryxlratmt.jpg"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CHANNELS = 256
# relu3_1 (H, W); images are 4x larger.
SHAPES = {"train": (40, 40), "cufed5": (83, 125), "1080p": (270, 480)}
LARGE_SHAPE = "1080p"
# swap levels: layer -> (scale relative to relu3_1, channels)
LEVELS = {"relu3_1": (1, 256), "relu2_1": (2, 128), "relu1_1": (4, 64)}


def large_mode() -> str:
    """``"default"``, ``"all"`` (SRNTT_BENCH_LARGE=1) or ``"off"`` (SRNTT_BENCH_LARGE=0)."""
    value = os.environ.get("SRNTT_BENCH_LARGE", "").strip().lower()
    if value in ("", "default"):
        return "default"
    return "off" if value in ("0", "no", "off", "false") else "all"


def skip_large(shape: str, case: tuple, default_cases, estimate: str = "") -> None:
    """Skips a 1080p case unless SRNTT_BENCH_LARGE asks for it or it is one of ``default_cases``."""
    if shape != LARGE_SHAPE:
        return
    mode = large_mode()
    if mode == "off":
        pytest.skip("1080p disabled (SRNTT_BENCH_LARGE=0)")
    if mode == "default" and case not in default_cases:
        pytest.skip(f"1080p opt-in: set SRNTT_BENCH_LARGE=1{f' ({estimate})' if estimate else ''}")


def memory_budget() -> int:
    """Bytes a peer may use before it is skipped: half of what is free now, at most 8 GiB."""
    if DEVICE.type == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(free * 0.8)
    try:
        text = Path("/proc/meminfo").read_text()
        free = int(re.search(r"MemAvailable:\s+(\d+)", text).group(1)) * 1024
    except (OSError, AttributeError):
        free = 16 << 30
    return min(free // 2, 8 << 30)


def skip_if_too_big(needed: int, what: str) -> None:
    budget = memory_budget()
    if needed > budget:
        pytest.skip(f"needs ~{needed / 2**30:.1f} GiB ({what}) > budget {budget / 2**30:.1f} GiB")


# ---------------------------------------------------------------------------------------------
# collection and parameters

def pytest_collect_file(file_path, parent):
    # Explicit file arguments are collected by pytest itself; collecting them here too would double them.
    is_bench = file_path.suffix == ".py" and file_path.name.startswith("bench_")
    if is_bench and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        # SRNTT_BENCH_SHAPES=train,cufed5 restricts the run (quick checks, CI smoke runs).
        wanted = os.environ.get("SRNTT_BENCH_SHAPES", "").replace(" ", "")
        shapes = [s for s in wanted.split(",") if s in SHAPES] if wanted else list(SHAPES)
        metafunc.parametrize("shape", shapes)
    if "features" in metafunc.fixturenames:
        metafunc.parametrize("features", ["real", "random"])


def pytest_configure(config):
    # make bench writes to benchmarks/results/<machine>/bench.json; the folder may not exist yet.
    # NB: some pytest-benchmark versions hand over an already opened file (argparse.FileType).
    path = config.getoption("benchmark_json", None)
    if isinstance(path, (str, os.PathLike)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    config._srntt_skipped = []
    config._srntt_load_start = os.getloadavg()


_SKIPPED: list[dict] = []


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call") and isinstance(report.longrepr, tuple):
        reason = report.longrepr[2].removeprefix("Skipped: ")
        _SKIPPED.append({"name": report.nodeid.split("::")[-1], "reason": reason})


def _build() -> dict:
    import subprocess

    import srntt_core

    package = Path(srntt_core.__file__).resolve().parent
    # SRNTT_BENCH_COMMIT names the commit when the package runs from a copy outside the repository
    # (a snapshot taken so that a rebuild of the extension cannot change it mid-run).
    where = "srntt_core" if package == REPO / "srntt_core" else "a copy outside the repository"
    info = {"package": where, "build_info": srntt_core.build_info(),
            "commit": os.environ.get("SRNTT_BENCH_COMMIT")}
    if info["commit"] is None:
        try:
            out = subprocess.run(["git", "-C", str(package.parent), "rev-parse", "HEAD"],
                                 capture_output=True, text=True, timeout=30)
            info["commit"] = out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["srntt"] = {
        **_build(),
        "machine": machine_name(str(DEVICE)),
        "device": str(DEVICE),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_start": config._srntt_load_start,
        "load_average_end": os.getloadavg(),
        "large_mode": large_mode(),
        "skipped": _SKIPPED,
    }


# ---------------------------------------------------------------------------------------------
# inputs

def _to_tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)[None].float().div(255)


@functools.cache
def real_images(shape: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, reference) RGB in [0, 1], (1, 3, 4H, 4W): the two halves of the Sun80 image."""
    from PIL import Image

    if not IMAGE.is_file():
        pytest.skip(f"real features need {IMAGE} (set SRNTT_DATA to the dataset folder)")
    h, w = SHAPES[shape]
    img = Image.open(IMAGE)
    half = img.width // 2
    halves = [img.crop((0, 0, half, img.height)), img.crop((half, 0, 2 * half, img.height))]
    target, ref = (_to_tensor(p.resize((4 * w, 4 * h), Image.BICUBIC)) for p in halves)
    return target.to(DEVICE), ref.to(DEVICE)


@functools.cache
def vgg() -> torch.nn.Module:
    from srntt_core.models.vgg import VGG19Features

    return VGG19Features(tuple(LEVELS)).to(DEVICE)


@functools.cache
def match_inputs(shape: str, features: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(query, key) relu3_1 maps (1, 256, H, W): SRNTT's LR-up vs blurred reference for ``real``."""
    if features == "random":
        g = torch.Generator().manual_seed(0)
        h, w = SHAPES[shape]
        return (torch.randn(1, CHANNELS, h, w, generator=g).to(DEVICE),
                torch.randn(1, CHANNELS, h, w, generator=g).to(DEVICE))
    target, ref = real_images(shape)
    with torch.no_grad():
        query = vgg()(sw.bicubic(sw.bicubic(target, 0.25), 4))["relu3_1"]
        key = vgg()(sw.bicubic(sw.bicubic(ref, 0.25), 4))["relu3_1"]
    return query.contiguous(), key.contiguous()


@functools.cache
def swap_values(shape: str, features: str) -> dict[str, torch.Tensor]:
    """Reference features at every swap level: ``{layer: (1, Cv, H*s, W*s)}``."""
    h, w = SHAPES[shape]
    if features == "random":
        g = torch.Generator().manual_seed(1)
        return {layer: torch.randn(1, c, h * s, w * s, generator=g).to(DEVICE)
                for layer, (s, c) in LEVELS.items()}
    with torch.no_grad():
        feats = vgg()(real_images(shape)[1])
    return {layer: feats[layer].contiguous() for layer in LEVELS}


@functools.cache
def swap_index(shape: str, features: str) -> torch.Tensor:
    """A (1, Gh, Gw) index into the key grid: the real match (``cpu`` or best backend) or uniform random."""
    h, w = SHAPES[shape]
    gh, gw = h - 2, w - 2
    if features == "random":
        g = torch.Generator().manual_seed(2)
        return torch.randint(0, gh * gw, (1, gh, gw), generator=g).to(DEVICE)
    import srntt_core.swap as sw

    query, key = match_inputs(shape, "real")
    with torch.no_grad():
        return sw.patch_match(query, key).index


# ---------------------------------------------------------------------------------------------
# the fixture

class Bench:
    """``bench.run(fn, ...)``: time ``fn`` with few pedantic rounds, record memory and extra_info."""

    def __init__(self, benchmark):
        self.benchmark = benchmark

    def run(self, fn, *, group: str, provider: str, shape: str, features: str, n_query: int, n_key: int,
            rounds: int = 3, warmup: int = 0, flops: float | None = None, nbytes: float | None = None,
            **info):
        probe, peaks = PeakMemory(DEVICE), []

        def setup():
            probe.start()

        def teardown():
            peaks.append(probe.stop())

        def target():
            out = fn()
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
            return out

        self.benchmark.group = group
        with torch.no_grad():
            result = self.benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=rounds,
                                             iterations=1, warmup_rounds=warmup)
        stats = getattr(self.benchmark, "stats", None)
        best = stats.stats.min if stats is not None else None
        measured = [p for p in peaks if p is not None]
        h, w = SHAPES[shape]
        self.benchmark.extra_info.update({
            "backend": provider,
            "shape": f"{h}x{w} vs {h}x{w}",
            "shape_name": shape,
            "features": features,
            "n_query": n_query,
            "n_key": n_key,
            "gflops": round(flops / best / 1e9, 2) if flops and best else None,
            "gbps": round(nbytes / best / 1e9, 2) if nbytes and best else None,
            "peak_mem_mb": round(max(measured) / 2**20, 1) if measured else None,
            "device": machine_name(str(DEVICE)),
            "threads": torch.get_num_threads(),
            "load_1m": round(os.getloadavg()[0], 2),
            **info,
        })
        return result


@pytest.fixture
def bench(benchmark):
    return Bench(benchmark)


@pytest.fixture(scope="session")
def data():
    """The inputs and skip rules, for the bench files (which should not import conftest)."""
    import types

    return types.SimpleNamespace(
        DEVICE=DEVICE, SHAPES=SHAPES, LEVELS=LEVELS, CHANNELS=CHANNELS, LARGE_SHAPE=LARGE_SHAPE,
        match_inputs=match_inputs, swap_values=swap_values, swap_index=swap_index,
        real_images=real_images, vgg=vgg, bicubic=sw.bicubic,
        skip_large=skip_large, skip_if_too_big=skip_if_too_big, large_mode=large_mode,
    )
