"""Shared fixtures for the srntt_core tests: backend parametrization, the float64 oracle, real features.

The oracle is the ``torch`` backend run in float64 (``srntt_core.ops.torch_backend``). On the small shapes
used here the tests also build the dense float64 similarity matrix, which gives the exact top-2
margin and the exact score of whatever key a backend chose (docs/CONTRACT.md §4: indices are compared exactly
only where the margin exceeds the tolerance; the chosen key's exact score must be within tolerance
of the exact maximum everywhere).
"""

import os

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

from srntt_core.ops import dispatch, torch_backend  # noqa: E402

# Small crops of real images, shipped with the tests (provenance: tests/data/README.md).
TEST_IMAGES = Path(__file__).parent / "data" / "images"
EPS = torch_backend.EPS
# docs/CONTRACT.md §4, precision="highest": chosen key's exact score within this of the exact maximum.
TOL = 1e-5


# ---------------------------------------------------------------------------------------------
# backends

@dataclass(frozen=True)
class BackendCase:
    name: str
    device: str

    def __str__(self):
        return self.name if self.device == "cpu" else f"{self.name}-{self.device}"


def _backend_cases():
    # Triton on the CPU runs in the interpreter: far too slow for these tests (the Triton kernels
    # have their own); on a CUDA device it is tested like every other backend.
    cases = [pytest.param(BackendCase(n, "cpu"), id=n) for n in ("cpu", "torch")]
    if torch.cuda.is_available():
        cases += [pytest.param(BackendCase(n, "cuda"), id=f"{n}-cuda", marks=getattr(pytest.mark, m))
                  for n, m in (("cuda", "cuda"), ("triton", "triton"), ("torch", "cuda"))]
    return cases


def pytest_generate_tests(metafunc):
    # Only tests that take the `backend` fixture and do not parametrize it themselves.
    def names(marker):
        args = marker.args[0]
        return [a.strip() for a in args.split(",")] if isinstance(args, str) else list(args)

    own = any("backend" in names(m) for m in metafunc.definition.iter_markers("parametrize"))
    if "backend" in metafunc.fixturenames and not own:
        metafunc.parametrize("backend", _backend_cases(), indirect=True)


@pytest.fixture
def backend(request) -> BackendCase:
    case = request.param
    reasons = dispatch.get(case.name).not_supported_reasons(torch.device(case.device))
    if reasons:
        pytest.skip(f"backend {case.name!r} cannot run on {case.device}: {'; '.join(reasons)}")
    return case


def cpu_backends_available() -> list[str]:
    """CPU backends this test run can use (everything but the Triton interpreter)."""
    return [n for n in dispatch.available("cpu") if n != "triton"]


# ---------------------------------------------------------------------------------------------
# inputs

def features(*shape, seed=0, dtype=torch.float32, device="cpu"):
    """ReLU-like random features (non-negative mostly, some exact zeros), as relu3_1 maps are."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).clamp_min(-0.3).to(dtype).to(device)


def grid(size: int, patch_size: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - patch_size) // stride + 1


# ---------------------------------------------------------------------------------------------
# the float64 oracle

@dataclass
class Exact:
    """float64 ground truth for one patch_match problem (small shapes only)."""

    index: torch.Tensor  # (B, Gh, Gw) from the float64 torch backend (the oracle)
    score: torch.Tensor  # (B, Gh, Gw) exact best score
    margin: torch.Tensor  # (B, Gh, Gw) exact top-1 minus top-2 score (inf with a single key patch)
    sim: torch.Tensor  # (B, Nq, Nk) dense float64 cosine similarities

    def chosen(self, index: torch.Tensor) -> torch.Tensor:
        """Exact score of the key patch that ``index`` names, per query cell."""
        b = index.shape[0]
        idx = index.to(self.sim.device).reshape(b, -1, 1)
        return self.sim.gather(2, idx).view(self.score.shape)


def dense_similarity(query, keys, patch_size, stride, padding):
    """(B, Nq, Nk) float64 cosine similarity over the concatenated key grids (test sizes only)."""
    def unit(x):
        d = F.unfold(x.double().cpu(), patch_size, padding=padding, stride=stride)
        return d / d.norm(dim=1, keepdim=True).clamp_min(EPS)

    return torch.bmm(unit(query).transpose(1, 2), torch.cat([unit(k) for k in keys], dim=2))


def exact_match(query, keys, patch_size=3, stride=1, padding=0) -> Exact:
    keys = [keys] if isinstance(keys, torch.Tensor) else list(keys)
    q64 = query.detach().double().cpu()
    k64 = [k.detach().double().cpu() for k in keys]
    index, score = torch_backend.patch_match(q64.contiguous(), [k.contiguous() for k in k64],
                                             patch_size, stride, padding)
    sim = dense_similarity(q64, k64, patch_size, stride, padding)
    shape = index.shape
    if sim.shape[2] > 1:
        top2 = sim.topk(2, dim=2).values
        margin = (top2[..., 0] - top2[..., 1]).view(shape)
    else:
        margin = torch.full(shape, float("inf"), dtype=torch.float64)
    exact = Exact(index, sim.max(dim=2).values.view(shape), margin, sim)
    # The oracle must agree with the dense computation it is checked against.
    torch.testing.assert_close(score, exact.score, atol=1e-12, rtol=0)
    assert (exact.score - exact.chosen(index)).max().item() <= 1e-12
    return exact


def assert_match(result, exact: Exact, tol: float = TOL):
    """docs/CONTRACT.md §4 comparison of a backend's ``PatchMatch`` against the float64 oracle."""
    index, score = result.index.cpu(), result.score.detach().cpu()
    assert index.dtype == torch.int64, index.dtype
    assert index.shape == exact.index.shape and score.shape == exact.index.shape
    assert index.min().item() >= 0 and index.max().item() < exact.sim.shape[2]
    sure = exact.margin > tol
    mismatch = (index != exact.index) & sure
    assert not mismatch.any(), (
        f"{int(mismatch.sum())} indices differ where the exact top-2 margin > {tol}: "
        f"got {index[mismatch][:5].tolist()}, exact {exact.index[mismatch][:5].tolist()}")
    shortfall = exact.score - exact.chosen(index)
    worst = shortfall.max().item()
    assert worst <= tol, f"chosen key's exact score is {worst:.3g} below the exact max"
    torch.testing.assert_close(score.double(), exact.score, atol=tol, rtol=0)


def naive_feature_swap(values, index, patch_size=3, stride=1, padding=0, scale=1, out_size=None,
                       reduce="mean"):
    """docs/CONTRACT.md §3 written as literally as possible (Python loops over cells, float64)."""
    values = [values] if isinstance(values, torch.Tensor) else list(values)
    values = [v.detach().double().cpu() for v in values]
    index = index.cpu()
    b, cv = values[0].shape[:2]
    gqh, gqw = index.shape[-2:]
    win, step, pad = patch_size * scale, stride * scale, padding * scale
    if out_size is None:
        out_size = (((gqh - 1) * stride + patch_size - 2 * padding) * scale,
                    ((gqw - 1) * stride + patch_size - 2 * padding) * scale)
    oh, ow = out_size
    cells = []  # flat key cell -> (reference, u, v)
    for r, v in enumerate(values):
        gkh = grid(v.shape[-2] // scale, patch_size, stride, padding)
        gkw = grid(v.shape[-1] // scale, patch_size, stride, padding)
        cells += [(r, u, w) for u in range(gkh) for w in range(gkw)]
    out = torch.zeros(b, cv, oh, ow, dtype=torch.float64)
    count = torch.zeros(oh, ow, dtype=torch.float64)
    for bi in range(b):
        for i in range(gqh):
            for j in range(gqw):
                r, u, w = cells[int(index[bi, i, j])]
                src = values[r][bi]
                for dy in range(win):
                    for dx in range(win):
                        y, x = i * step - pad + dy, j * step - pad + dx
                        if not (0 <= y < oh and 0 <= x < ow):
                            continue
                        if bi == 0:
                            count[y, x] += 1
                        sy, sx = u * step - pad + dy, w * step - pad + dx
                        if 0 <= sy < src.shape[-2] and 0 <= sx < src.shape[-1]:
                            out[bi, :, y, x] += src[:, sy, sx]
    if reduce == "mean":
        out = torch.where(count > 0, out / count.clamp(min=1), 0.0)
    return out


def random_index(values, out_grid, patch_size=3, stride=1, padding=0, scale=1, batch=None, seed=0):
    """A valid random index (B, Gq_h, Gq_w) over the key grids of ``values``."""
    values = [values] if isinstance(values, torch.Tensor) else list(values)
    n = sum(grid(v.shape[-2] // scale, patch_size, stride, padding)
            * grid(v.shape[-1] // scale, patch_size, stride, padding) for v in values)
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
