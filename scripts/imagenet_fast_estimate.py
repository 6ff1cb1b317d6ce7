"""What profile=imagenet_fast would cost on 8 x H100, per bar and for the 17-bar roadmap: an estimate.

It is an estimate, not a measurement: no such run has been made. It scales one measured anchor by training FLOPs:

- the anchor: FFCV's ResNet-50, 16 epochs at 160 -> 192 px (ramp over epochs 11-13), 14.9 min on 8 x A100
  (ffcv-imagenet README, rn50_16_epochs.yaml): 1.99 A100-hours for 16 x 1.28 M images at the mean pixel count of
  that schedule, on a data path (FFCV's) that kept the GPUs busy;
- a bar's cost = anchor A100-hours per epoch per GFLOP at 224 px x the bar's GFLOPs at 224 px (fvcore, full width:
  the `gflops` of docs/summary.csv, from the project's complexity counts) x the epochs x the mean (res / 224)^2 of
  profile=imagenet_fast's resolution schedule (ablations.data.train_resolution), plus one 50k-image evaluation at
  eval_img_size per epoch (a forward pass: a third of a training image's FLOPs);
- A100 -> H100: 1.5-2x for bf16 convnet training (an assumed range; the low end of NVIDIA's published figures);
- ConvNeXt's depthwise convolutions run at a lower share of the GPU's peak than ResNet's dense ones, so the steps
  from depthwise_conv on get a 1-2x penalty over the FLOP scaling (an assumed range, to be replaced by the
  benchmark's img/s on the first GPU session: python -m ablations.benchmark --device cuda).

    .venv/bin/python scripts/imagenet_fast_estimate.py [--out docs/imagenet_fast.md]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000
ANCHOR = dict(minutes=14.9, gpus=8, epochs=16, gflops=4.09, start=160, end=192, ramp=(11, 13))  # FFCV rn50, A100
H100_SPEEDUP = (1.5, 2.0)  # over an A100 (assumed range)
DEPTHWISE_PENALTY = (1.0, 2.0)  # steps with depthwise convs, over the FLOP scaling (assumed range)
DEPTHWISE_FROM = "depthwise_conv"


def _ffcv_res(epoch: int, start: int, end: int, ramp: tuple[float, float], multiple: int = 32) -> int:
    """FFCV's get_resolution (0-based epochs), as ablations.data.train_resolution."""
    import numpy as np

    if epoch <= ramp[0]:
        return start
    if epoch >= ramp[1]:
        return end
    return int(np.round(np.interp(epoch, list(ramp), [start, end]) / multiple)) * multiple


def mean_pixels(sizes: list[int]) -> float:
    """Mean (res / 224)^2 over the epochs' training resolutions: the share of 224 px FLOPs an epoch costs."""
    return sum((s / 224) ** 2 for s in sizes) / len(sizes)


def profile_sizes() -> tuple[list[int], int, int]:
    """profile=imagenet_fast's per-epoch training resolutions, its evaluation resolution and its epochs."""
    from hydra import compose, initialize_config_dir

    from ablations.config import register
    from ablations.data import eval_resolution, train_resolution

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["profile=imagenet_fast", "data.root=/imagenet"])
    epochs = int(cfg.train.epochs)
    return [train_resolution(cfg.data, e) for e in range(1, epochs + 1)], eval_resolution(cfg.data), epochs


def estimate(summary: Path) -> tuple[list[dict], dict]:
    """Per bar (docs/summary.csv, regime r50): GFLOPs and the low / high 8 x H100 hours of one run."""
    a = ANCHOR
    anchor_sizes = [_ffcv_res(e, a["start"], a["end"], a["ramp"]) for e in range(a["epochs"])]
    a100_h = a["minutes"] / 60 * a["gpus"]
    per_gflop_epoch = a100_h / (a["epochs"] * a["gflops"] * mean_pixels(anchor_sizes))  # A100-h per GFLOP-epoch
    sizes, eval_size, epochs = profile_sizes()
    share = mean_pixels(sizes) + (IMAGENET_VAL / IMAGENET_TRAIN) * (eval_size / 224) ** 2 / 3
    rows = [r for r in csv.DictReader(summary.open()) if r["regime"] == "r50"]
    order = [r["bar"] for r in rows]
    dw_from = order.index(DEPTHWISE_FROM) if DEPTHWISE_FROM in order else len(order)
    out = []
    for i, r in enumerate(rows):
        gflops = float(r["gflops"])
        a100 = per_gflop_epoch * gflops * epochs * share
        penalty = DEPTHWISE_PENALTY if i >= dw_from and not r["bar"].startswith("baseline") else (1.0, 1.0)
        low, high = a100 / H100_SPEEDUP[1] * penalty[0], a100 / H100_SPEEDUP[0] * penalty[1]
        out.append({"bar": r["bar"], "gflops": gflops, "h100_h_low": low, "h100_h_high": high})
    info = {"epochs": epochs, "sizes": sizes, "eval": eval_size, "share": share,
            "anchor_share": mean_pixels(anchor_sizes), "per_gflop_epoch": per_gflop_epoch}  # fmt: skip
    return out, info


def markdown(rows: list[dict], info: dict) -> str:
    lo, hi = sum(r["h100_h_low"] for r in rows), sum(r["h100_h_high"] for r in rows)
    lines = [
        "# profile=imagenet_fast: what the roadmap costs on ImageNet (an estimate)",
        "",
        "Written by `python scripts/imagenet_fast_estimate.py` (its docstring: the method and the assumed ranges).",
        "No imagenet_fast run has been made yet: these are FFCV's measured ResNet-50 time scaled by each step's "
        "training FLOPs, not measurements. The first GPU session should replace them with the benchmark's img/s.",
        "",
        f"- Schedule: {info['epochs']} epochs, training at {', '.join(map(str, sorted(set(info['sizes']))))} px "
        f"(per epoch: {' '.join(map(str, info['sizes']))}), evaluation at {info['eval']} px every epoch: "
        f"{info['share']:.3f} of the FLOPs of training at 224 px (FFCV's 16-epoch anchor: {info['anchor_share']:.3f}).",
        f"- Anchor: FFCV ResNet-50, 16 epochs, 14.9 min on 8 x A100: {info['per_gflop_epoch']:.4f} A100-hours "
        "per GFLOP (the model's at 224 px) per epoch of 224 px images.",
        f"- A100 -> H100: {H100_SPEEDUP[0]}-{H100_SPEEDUP[1]}x; steps from depthwise_conv on: "
        f"{DEPTHWISE_PENALTY[0]}-{DEPTHWISE_PENALTY[1]}x slower than their FLOPs say (both assumed).",
        "",
        "| bar | GFLOPs (224 px) | H100-hours, one run | 8 x H100 wall time |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['bar']} | {r['gflops']:.2f} | {r['h100_h_low']:.1f}-{r['h100_h_high']:.1f} | "
                     f"{r['h100_h_low'] / 8 * 60:.0f}-{r['h100_h_high'] / 8 * 60:.0f} min |")  # fmt: skip
    lines += [
        f"| **all {len(rows)} bars, one seed** | | **{lo:.0f}-{hi:.0f}** | **{lo / 8:.1f}-{hi / 8:.1f} h** |",
        "",
        "The paper's figure took 300 epochs per bar: at the same FLOP scaling about "
        f"{300 / info['epochs'] * (1 / info['share']):.0f}x this (300 epochs at 224 px).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--summary", type=Path, default=ROOT / "docs/summary.csv", help="per-bar GFLOPs (analysis)")
    p.add_argument("--out", type=Path, default=ROOT / "docs/imagenet_fast.md")
    a = p.parse_args(argv)
    rows, info = estimate(a.summary)
    text = markdown(rows, info)
    a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
