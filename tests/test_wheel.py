"""The package as a stranger installs it: `pip wheel` builds a wheel from a copy of the sources, a
fresh virtual environment installs it, and it works from an unrelated folder (the bundled VGG
weights, checkpoint and demo sample inside the package; the Triton kernels as srntt_core._triton,
no top-level `kernels`). The sdist carries everything the build needs.

Slow: it compiles the C++ extension once more (CPU kernels only, whatever the machine).
"""

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TEST_IMAGES = Path(__file__).parent / "data" / "images"


def _sources(dest: Path) -> Path:
    """The repository's tracked and untracked-but-not-ignored files, copied to ``dest``."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())
    return dest


def _run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, **kw)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = _sources(tmp / "src")
    env = {**os.environ, "SRNTT_NO_CUDA": "1"}
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w",
          str(tmp / "dist"), str(src)], env=env)
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp / "dist")], cwd=src, env=env)
    return tmp


def test_wheel_contents(built):
    (wheel,) = (built / "dist").glob("srntt_core-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for want in ("srntt_core/swap.py", "srntt_core/_triton/__init__.py", "srntt_core/_triton/patch_match.py",
                 "srntt_core/models/weights/vgg19_conv1_1-conv3_1.pth", "srntt_core/checkpoints/srntt_l2.pt",
                 "srntt_core/assets/zebra.png"):
        assert want in names, want
    assert any(n.startswith("srntt_core/_C") and n.endswith(".so") for n in names)
    assert not any(n.split("/")[0] == "kernels" for n in names), "a top-level `kernels` package"


def test_sdist_carries_the_sources(built):
    (sdist,) = (built / "dist").glob("srntt_core-*.tar.gz")
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for want in ("csrc/srntt_ops.cpp", "csrc/cpu/cpu_dispatch.h", "csrc/cpu/gemm_tile_cpu.h",
                 "csrc/cuda/patch_match.cuh", "csrc/cuda/patch_match_binding.cu", "kernels/patch_match.py",
                 "srntt_core/models/weights/vgg19_conv1_1-conv3_1.pth", "setup.py", "pyproject.toml"):
        assert want in names, want


def test_installed_wheel_runs_anywhere(built, tmp_path):
    (wheel,) = (built / "dist").glob("srntt_core-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    py = venv / "bin" / "python"
    # The new environment reuses this one's torch (and numpy, Pillow, tqdm) through a .pth line: a
    # path listed there is searched after the venv's own packages, and its .pth files are not run.
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    (site / "outer_packages.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)])

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SRNTT_BACKEND")}
    check = (
        "import importlib.util, sys\n"
        "from pathlib import Path\n"
        "import torch\n"
        "import srntt_core, srntt_core.swap as sw\n"
        f"assert Path(srntt_core.__file__).is_relative_to({str(venv)!r}), srntt_core.__file__\n"
        "assert importlib.util.find_spec('kernels') is None\n"
        "import srntt_core._triton\n"
        "q, k = torch.rand(1, 8, 12, 12), torch.rand(1, 8, 10, 14)\n"
        "m = sw.patch_match(q, k, backend='cpu')\n"
        "ref = sw.patch_match(q.double(), k.double(), backend='torch')\n"
        "assert torch.equal(m.index, ref.index)\n"
        "print(srntt_core.build_info())\n"
    )
    info = _run([str(py), "-c", check], cwd=work, env=env)
    assert "extension loaded" in info and "cpu: ok" in info, info
    srntt = venv / "bin" / "srntt"
    demo = _run([str(srntt), "demo", "-o", "demo"], cwd=work, env=env)
    assert "PSNR" in demo, demo
    assert any((work / "demo").iterdir())
    _run([str(srntt), "sr", str(TEST_IMAGES / "zebra_target.png"),
          "--ref", str(TEST_IMAGES / "zebra_ref.png"), "-o", "sr.png"], cwd=work, env=env)
    from PIL import Image

    assert Image.open(work / "sr.png").size == (4 * 96, 4 * 64)
