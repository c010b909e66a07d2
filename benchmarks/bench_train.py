"""One SRNTT-l2 training step (``srntt train``'s step: texture swap, then the generator's forward,
L1 loss, backward and Adam update) under the settings that decide what a step costs: HR crop, batch,
``channels_last``, torch threads; and the step split into its two stages (the no-grad texture swap and the
generator update), which tells how much caching a reference's features across steps could save.

Real pixels: crops of the two halves of the Sun80 image (the split-image protocol), the reference
crop 4/3 of the HR crop as in the bundled model's training (96 -> 128). The model is the default
SRNTT with ``residual="bicubic"``. ``extra_info`` carries samples/s and HR pixels/s, the cost
measures to compare settings by; the load average is in the JSON, so compare ratios within a run.
"""

from __future__ import annotations

import pytest
import torch

import srntt_core.swap as sw
from srntt_core.models import train as T
from srntt_core.models.srntt import SRNTT

ROUNDS = 3
# (HR crop, batch, channels_last, threads): the bundled model's setting (96, 4, 1 thread) and its
# neighbours.
SETTINGS = [(64, 4, False, 1), (96, 2, False, 1), (96, 4, False, 1), (96, 4, True, 1), (96, 4, False, 2),
            (128, 4, False, 1), (96, 8, False, 1)]
BUNDLED = (96, 4, False, 1)
STAGES = ["step", "swap", "generator"]
THREADS = torch.get_num_threads()


def _name(crop: int, batch: int, channels_last: bool, threads: int) -> str:
    return f"crop{crop}-batch{batch}{'-cl' if channels_last else ''}-t{threads}"


def _crops(data, crop: int, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(LR, HR, reference) batches from fixed, distinct positions of the two halves."""
    target, ref = data.real_images("cufed5")
    rc = crop * 4 // 3 // sw.UPSCALE * sw.UPSCALE
    hr, refs = [], []
    for i in range(batch):
        y, x = (17 * i) % (target.shape[-2] - crop), (53 * i) % (target.shape[-1] - crop)
        hr.append(target[..., y:y + crop, x:x + crop])
        y, x = (29 * i) % (ref.shape[-2] - rc), (41 * i) % (ref.shape[-1] - rc)
        refs.append(ref[..., y:y + rc, x:x + rc])
    hr = torch.cat(hr)
    return sw.bicubic(hr, 1 / sw.UPSCALE).clamp(0, 1), hr, torch.cat(refs)


def _nets(data, channels_last: bool) -> tuple[dict, T.TrainConfig]:
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = SRNTT(residual="bicubic").to(data.DEVICE, memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    cfg = T.TrainConfig(data=[], out="", residual="bicubic")
    return {"model": model, "opt": opt, "scaler": scaler}, cfg


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("setting", SETTINGS, ids=[_name(*s) for s in SETTINGS])
def test_train_step(bench, data, stage, setting):
    if stage != "step" and setting != BUNDLED:
        pytest.skip("the stage split runs at the bundled model's setting only")
    crop, batch, channels_last, threads = setting
    torch.set_num_threads(threads)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    lr_img, hr, ref = (t.contiguous(memory_format=fmt) for t in _crops(data, crop, batch))
    nets, cfg = _nets(data, channels_last)
    extractor = data.vgg()
    with torch.no_grad():
        fixed = sw.texture_swap(lr_img, ref, extractor=extractor)

    def swap():
        with torch.no_grad():
            return sw.texture_swap(lr_img, ref, extractor=extractor)

    def generator(s):
        with torch.enable_grad():
            return T._generator_step(nets, cfg, lr_img * 2 - 1, hr * 2 - 1, s.maps, s.weights, False, False)

    fn = {"step": lambda: generator(swap()), "swap": swap, "generator": lambda: generator(fixed)}[stage]
    try:
        bench.run(fn, group=f"train step {stage}", provider=_name(*setting), shape="train", features="real",
                  n_query=0, n_key=0, rounds=ROUNDS, warmup=1, crop=crop, batch=batch,
                  channels_last=channels_last, stage=stage)
    finally:
        torch.set_num_threads(THREADS)
    best = bench.benchmark.stats.stats.min
    bench.benchmark.extra_info.update(samples_per_s=round(batch / best, 4),
                                      hr_pixels_per_s=round(batch * crop * crop / best, 1))
