"""fvcore complexity of roadmap models, and the roadmap table side by side with the paper.

python -m ablations.complexity --regime r50 [--img-size 224 --num-classes 1000] [--golden tests/golden/x.json]
python -m ablations.complexity --without gelu[,bn_to_ln] [--step separate_downsampling]   # one toggled model
python -m ablations.complexity --leave-one-out [--step separate_downsampling]            # every leave-one-out model
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from fvcore.nn import ActivationCountAnalysis, FlopCountAnalysis

from ablations import ROADMAP, TABLE10_GFLOPS, TABLE10_MISPRINTS, VARIANTS, paper, table10_gflops_gain
from models import ConfigError, build_model
from models.roadmap import active_steps

PAPER_OPS = ("conv", "linear")  # the paper counts multiply-adds of conv and linear layers only


def complexity(model: torch.nn.Module, img_size: int = 224, in_chans: int | None = None) -> dict:
    """params, gflops (conv+linear multiply-adds), gflops_total (fvcore's total) and activations (M)."""
    in_chans = in_chans or model.stem.conv.in_channels
    was_training = model.training
    model.eval()  # fvcore traces; count the plain module in eval mode (never a compiled one)
    x = torch.zeros(1, in_chans, img_size, img_size)
    with torch.no_grad():
        flops = FlopCountAnalysis(model, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        by_op = flops.by_operator()
        acts = ActivationCountAnalysis(model, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        n_acts = acts.total()
    model.train(was_training)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "gflops": sum(by_op.get(op, 0) for op in PAPER_OPS) / 1e9,
        "gflops_total": flops.total() / 1e9,
        "activations_m": n_acts / 1e6,
    }


def roadmap_rows(regime: str = "r50", img_size: int = 224, num_classes: int = 1000, variants: bool = True, **overrides):
    """Yield one dict per step (and kernel variant) with our complexity and the paper's numbers."""
    entries = [(s.name, s.name, {}) for s in ROADMAP]
    if variants:
        entries += [
            (v, step, {k.split(".")[-1]: x for k, x in ov.items() if k.startswith("model.")})
            for v, (step, ov, _) in VARIANTS.items()
            if "train" not in ov
        ]
    for name, step, extra in entries:
        t = time.perf_counter()
        c = complexity(build_model(step, regime, num_classes=num_classes, **{**overrides, **extra}), img_size)
        p = paper(name)
        yield {
            "name": name,
            "step": step,
            **c,
            "paper_gflops": p.gflops.get(regime),  # Fig. 2, one decimal
            "table10_gflops": TABLE10_GFLOPS.get(name) if regime == "r50" else None,  # two decimals, as printed
            "paper_top1": p.top1.get(regime),
            "count_s": time.perf_counter() - t,
        }


def toggle_rows(
    step: str = "separate_downsampling",
    withouts: list[tuple[str, ...]] | None = None,
    regime: str = "r50",
    img_size: int = 224,
    num_classes: int = 1000,
):
    """Yield the full `step` and then `step` without each entry of withouts (default: every removable step, one at a
    time): params / GFLOPs, their change from the full model, and for a single removed step the change its paper
    roadmap step made (Table 10, r50), so what a removal costs is seen before it is trained."""
    if withouts is None:
        withouts = [(s,) for s in active_steps(step)[1:]]
    for without in withouts:  # every mistake before the first (slow) count
        active_steps(step, without)
    full = complexity(build_model(step, regime, num_classes=num_classes), img_size)
    yield {"name": f"{step} (full)", "without": (), **full, "d_params": 0, "d_gflops": 0.0, "paper_d_gflops": None}
    for without in withouts:
        c = complexity(build_model(step, regime, num_classes=num_classes, without=without), img_size)
        gain = table10_gflops_gain(without[0]) if len(without) == 1 and regime == "r50" else None
        yield {
            "name": f"without {'+'.join(without)}",
            "without": tuple(without),
            **c,
            "d_params": c["params"] - full["params"],
            "d_gflops": c["gflops"] - full["gflops"],
            "paper_d_gflops": None if gain is None else -gain,  # removal undoes the roadmap step's change
        }


def _print_toggles(args) -> int:
    """--without / --leave-one-out: the toggled models' complexity beside the full model's."""
    withouts = None if args.leave_one_out else [tuple(w for w in args.without.split(",") if w)]
    t0 = time.perf_counter()
    rows = toggle_rows(args.step, withouts, args.regime, args.img_size, args.num_classes)
    try:
        first = next(rows)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{'model':34s} {'params':>12s} {'d params':>12s} {'GFLOPs':>7s} {'d GFLOPs':>9s} {'fvcore':>7s} "
        f"{'roadmap d':>9s}"
    )
    for r in (first, *rows):
        paper_d = "" if r["paper_d_gflops"] is None else f"{r['paper_d_gflops']:+.2f}"
        print(
            f"{r['name']:34s} {r['params']:12,d} {r['d_params']:+12,d} {r['gflops']:7.3f} {r['d_gflops']:+9.3f} "
            f"{r['gflops_total']:7.3f} {paper_d:>9s}",
            flush=True,
        )
    print(
        f"\n{args.regime} at {args.img_size}px, {args.num_classes} classes; GFLOPs = conv+linear multiply-adds "
        f"(paper convention), fvcore = fvcore's full total; d = change from the full {args.step} when the step is "
        "switched off; roadmap d = minus the GFLOPs that step added on the paper's roadmap (Table 10, r50): what "
        f"removing it would cost if steps added up. Counted in {time.perf_counter() - t0:.1f}s."
    )
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regime", default="r50", choices=["r50", "r200"])
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--no-variants", action="store_true", help="skip the kernel 5/9/11 variants")
    ap.add_argument("--golden", help="also write the rows as JSON here (the tests' golden file)")
    ap.add_argument("--step", default="separate_downsampling", help="with --without / --leave-one-out: the full model")
    ap.add_argument("--without", help="comma-separated steps to switch off: the toggled model beside the full one")
    ap.add_argument("--leave-one-out", action="store_true", help="the full model without each removable step in turn")
    args = ap.parse_args(argv)
    if args.without or args.leave_one_out:
        return _print_toggles(args)
    t0 = time.perf_counter()
    rows = []
    print(
        f"{'step':24s} {'params':>12s} {'GFLOPs':>7s} {'T10':>6s} {'Fig.2':>6s} {'fvcore':>7s} {'acts(M)':>8s} "
        f"{'top1*':>6s}"
    )
    for r in roadmap_rows(args.regime, args.img_size, args.num_classes, not args.no_variants):
        rows.append(r)
        pg = "" if r["paper_gflops"] is None else f"{r['paper_gflops']:.1f}"
        t10 = "" if r["table10_gflops"] is None else f"{r['table10_gflops']:.2f}"
        t10 += "m" if r["name"] in TABLE10_MISPRINTS and args.regime == "r50" else ""
        print(
            f"{r['name']:24s} {r['params']:12,d} {r['gflops']:7.3f} {t10:>6s} {pg:>6s} {r['gflops_total']:7.3f} "
            f"{r['activations_m']:8.2f} {r['paper_top1'] or '':>6}",
            flush=True,
        )
    misprints = ", ".join(f"{n} {t:.2f} (architecture {a:.2f})" for n, (t, a) in TABLE10_MISPRINTS.items())
    print(
        f"\n{args.regime} at {args.img_size}px, {args.num_classes} classes; GFLOPs = conv+linear multiply-adds "
        f"(paper convention), fvcore = fvcore's full total; the paper's numbers are at 224px and 1000 classes: "
        f"T10 = Table 10 (two decimals; m = misprint: {misprints}), Fig.2 = one decimal, *ImageNet top-1. "
        f"Counted in {time.perf_counter() - t0:.1f}s."
    )
    if args.golden:
        keep = ("name", "params", "gflops", "gflops_total")
        with open(args.golden, "w") as f:
            json.dump(
                {
                    "regime": args.regime,
                    "img_size": args.img_size,
                    "num_classes": args.num_classes,
                    "rows": [{k: r[k] for k in keep} for r in rows],
                },
                f,
                indent=1,
            )
        print(f"wrote {args.golden}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def meta_complexity(model: torch.nn.Module, img_size: int = 224, in_chans: int | None = None) -> dict:
    """params and gflops (conv + linear multiply-adds, the paper's count) of a model built on the meta device:
    shapes only, no weights in memory, so it counts models too large to build (a factorial design's dense 7x7 convs
    on the 4x-wide inverted bottleneck reach 2.6 billion parameters at full width). torch's FlopCounterMode counts
    2 FLOPs per multiply-add of its conv / matmul ops; fvcore's total (norms, pooling) and activations are not
    available this way (None). The same numbers as complexity() for every roadmap step (tests/test_complexity.py)."""
    from torch.utils.flop_counter import FlopCounterMode

    in_chans = in_chans or model.stem.conv.in_channels
    was_training = model.training
    model.eval()
    x = torch.zeros(1, in_chans, img_size, img_size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "gflops": counter.get_total_flops() / 2 / 1e9,
        "gflops_total": None,
        "activations_m": None,
    }
