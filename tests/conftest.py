"""Shared fixtures for the srntt_core tests: the backend registry, inputs, real features.

The float64 oracle and the docs/CONTRACT.md §4 comparisons live in tests/oracle.py.
"""

import os
import sys

import torch

# NB: must run before anything imports `srntt_core` (and its Triton kernels): Triton reads it when kernels are
# decorated, so without a GPU the Triton tests can only use the interpreter if it is set first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from srntt_core.ops import dispatch  # noqa: E402

# The measuring helpers of the benchmarks (benchmarks/peak_memory.py) serve the memory tests too.
sys.path.append(str(Path(__file__).parents[1] / "benchmarks"))

from oracle import key_cells  # noqa: E402

# Small crops of real images, shipped with the tests (provenance: tests/data/README.md).
TEST_IMAGES = Path(__file__).parent / "data" / "images"


# ---------------------------------------------------------------------------------------------
# backends

@dataclass(frozen=True)
class BackendCase:
    name: str
    device: str
    mark: str | None = None
    # The Triton interpreter runs the kernels on the host: correct but slow, so tiny shapes only.
    interpreted: bool = False
    # float16/bfloat16 swaps sum in float32 and round once (the compiled kernels); the torch backend
    # sums in the values' dtype.
    half_rounds_once: bool = True
    # Bit-equal key patches score bit-equal against any query (so ties go to the smallest index
    # whatever the query). Triton's candidate lists overflow on a constant key, and its fallback
    # scan rounds a score by the key's position in its tile (docs/CONTRACT.md §2 allows that).
    duplicates_bit_equal: bool = True
    # The swap's mean divides with round-to-nearest. The C++ kernels do not (up to an ulp off).
    mean_rounds_to_nearest: bool = True

    def __str__(self):
        if self.interpreted:
            return f"{self.name}-interpreter"
        return self.name if self.device == "cpu" else f"{self.name}-{self.device}"


# Every backend the suites test, on every device it runs on. A new backend is tested everywhere
# (tests/test_conformance.py, the public-API suites) by registering it here.
REGISTRY = (
    BackendCase("cpu", "cpu", mean_rounds_to_nearest=False),
    BackendCase("torch", "cpu", half_rounds_once=False),
    BackendCase("triton", "cpu", mark="triton", interpreted=True, duplicates_bit_equal=False),
    BackendCase("cuda", "cuda", mark="cuda"),
    BackendCase("triton", "cuda", mark="triton", duplicates_bit_equal=False),
    BackendCase("torch", "cuda", mark="cuda", half_rounds_once=False),
)


def backend_cases(interpreted: bool = False, every_device: bool = False) -> list:
    """pytest params of the registered backends on the devices of this machine (of every device
    with ``every_device``: those of a missing device skip); the Triton interpreter (set up by this
    file without a GPU) only where ``interpreted`` asks for it."""
    cuda = torch.cuda.is_available()
    cases = [c for c in REGISTRY if c.device == "cpu" or cuda or (every_device and not c.interpreted)]
    cases = [c for c in cases if not c.interpreted or (interpreted and not cuda)]
    return [pytest.param(c, id=str(c), marks=[getattr(pytest.mark, c.mark)] if c.mark else []) for c in cases]


def pytest_generate_tests(metafunc):
    # Only tests that take the `backend` fixture and do not parametrize it themselves.
    def names(marker):
        args = marker.args[0]
        return [a.strip() for a in args.split(",")] if isinstance(args, str) else list(args)

    own = any("backend" in names(m) for m in metafunc.definition.iter_markers("parametrize"))
    if "backend" in metafunc.fixturenames and not own:
        metafunc.parametrize("backend", backend_cases(), indirect=True)


def skip_unless_runs(case: BackendCase) -> BackendCase:
    if case.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    reasons = dispatch.get(case.name).not_supported_reasons(torch.device(case.device))
    if reasons:
        pytest.skip(f"backend {case.name!r} cannot run on {case.device}: {'; '.join(reasons)}")
    return case


@pytest.fixture
def backend(request) -> BackendCase:
    return skip_unless_runs(request.param)


def cpu_backends_available() -> list[str]:
    """CPU backends this test run can use (everything but the Triton interpreter)."""
    return [n for n in dispatch.available("cpu") if n != "triton"]


# ---------------------------------------------------------------------------------------------
# inputs

def features(*shape, seed=0, dtype=torch.float32, device="cpu"):
    """ReLU-like random features (non-negative mostly, some exact zeros), as relu3_1 maps are."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).clamp_min(-0.3).to(dtype).to(device)


def random_index(values, out_grid, patch_size=3, stride=1, padding=0, scale=1, batch=None, seed=0):
    """A valid random index (B, Gq_h, Gq_w) over the key grids of ``values``."""
    values = [values] if isinstance(values, torch.Tensor) else list(values)
    n = key_cells(values, patch_size, stride, padding, scale)
    g = torch.Generator().manual_seed(seed)
    b = values[0].shape[0] if batch is None else batch
    return torch.randint(0, n, (b, *out_grid), generator=g, dtype=torch.int64).to(values[0].device)


# ---------------------------------------------------------------------------------------------
# real images and their VGG19 features

def load_image(name: str, box: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """A test image from tests/data/images (optionally cropped to the PIL ``box`` (left, top, right,
    bottom)) as (1, 3, H, W) float32 in [0, 1]."""
    from PIL import Image

    with Image.open(TEST_IMAGES / name) as im:
        img = im.convert("RGB")
    if box is not None:
        img = img.crop(box)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


@pytest.fixture(scope="session")
def real_images():
    """Small crops of real images: an LR target (16x24 -> 64x96 once upsampled) and two references
    of different sizes with similar textures (other parts of the same pictures)."""
    hr = load_image("zebra_target.png")
    lr = F.interpolate(hr, scale_factor=0.25, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    return {
        "hr": hr,
        "lr": lr,
        "refs": [load_image("zebra_ref.png"), load_image("baboon_ref.png")],
    }


@pytest.fixture(scope="session")
def vgg():
    from srntt_core.models.vgg import VGG19Features

    return VGG19Features(("relu1_1", "relu2_1", "relu3_1"))


@pytest.fixture(scope="session")
def real_features(real_images, vgg):
    """relu3_1 (and finer) features of the real crops: query 16x24, keys 16x24 and 12x18, C=256."""
    with torch.no_grad():
        lr_up = F.interpolate(real_images["lr"], scale_factor=4, mode="bicubic", align_corners=False)
        lr_up = lr_up.clamp(0, 1)
        query = vgg(lr_up)["relu3_1"]
        refs = [vgg(r) for r in real_images["refs"]]
    return {
        "query": query,
        "keys": [f["relu3_1"] for f in refs],
        "relu2_1": [f["relu2_1"] for f in refs],
        "relu1_1": [f["relu1_1"] for f in refs],
    }
