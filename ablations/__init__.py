"""The roadmap as data: one ordered list that the entry point, the tests and the analysis import.

Numbers are from ../shared/reference/paper_roadmap.md (Liu et al. 2022, Fig. 2 and Tables 10-11).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from models import STEPS


@dataclass(frozen=True)
class Step:
    """One roadmap bar: name (= conf/step/<name>.yaml), title, what changes, the paper's numbers."""

    name: str
    title: str
    change: str
    top1: dict = field(default_factory=dict)  # regime -> ImageNet-1K top-1 (%)
    gflops: dict = field(default_factory=dict)  # regime -> GFLOPs read off Fig. 2 (r50 only)
    adopted: bool = True


ROADMAP = [
    Step(
        "baseline",
        "ResNet-50 (modern recipe)",
        "torchvision ResNet-50 v1.5 trained with the Table 5 recipe",
        {"r50": 78.8, "r200": 81.1},
        {"r50": 4.1},
    ),
    Step(
        "stage_ratio",
        "stage ratio",
        "blocks per stage (3,4,6,3) -> (3,3,9,3); r200: (3,24,36,3) -> (3,3,27,3), width 84",
        {"r50": 79.4, "r200": 81.3},
        {"r50": 4.5},
    ),
    Step(
        "patchify_stem",
        '"patchify" stem',
        "7x7/2 conv + 3x3/2 max-pool -> 4x4 stride-4 conv + norm",
        {"r50": 79.5, "r200": 81.6},
        {"r50": 4.4},
    ),
    Step(
        "depthwise_conv",
        "depthwise conv",
        "bottleneck 3x3 conv -> depthwise (groups = channels)",
        {"r50": 78.3, "r200": 80.5},
        {"r50": 2.4},
    ),
    Step(
        "increase_width", "width ↑", "base width 64 -> 96 (r200: 84 -> 128)", {"r50": 80.5, "r200": 81.9}, {"r50": 5.3}
    ),
    Step(
        "inverted_bottleneck",
        "inverting dims",
        "1x1 C->4C, depthwise 3x3 on 4C, 1x1 4C->C",
        {"r50": 80.6, "r200": 82.6},
        {"r50": 4.6},
    ),
    Step(
        "move_up_dwconv",
        "move ↑ d. conv",
        "depthwise conv first: dw kxk on C, 1x1 C->4C, 1x1 4C->C",
        {"r50": 79.9, "r200": 82.0},
        {"r50": 4.1},
    ),
    Step("large_kernel", "kernel sz. → 7", "depthwise kernel 3 -> 7", {"r50": 80.6, "r200": 82.3}, {"r50": 4.2}),
    Step("gelu", "ReLU ➝ GELU", "every activation becomes GELU", {"r50": 80.6, "r200": 82.2}, {"r50": 4.2}),
    Step(
        "fewer_activations",
        "fewer activations",
        "one GELU per block, between the two 1x1 convs",
        {"r50": 81.3, "r200": 82.7},
        {"r50": 4.2},
    ),
    Step(
        "fewer_norms",
        "fewer norms",
        "one norm per block, after the depthwise conv (+ layer scale)",
        {"r50": 81.4, "r200": 83.2},
        {"r50": 4.2},
    ),
    Step(
        "bn_to_ln",
        "BN ➝ LN",
        "every BatchNorm becomes LayerNorm over channels",
        {"r50": 81.5, "r200": 83.4},
        {"r50": 4.2},
    ),
    Step(
        "separate_downsampling",
        "sep. d.s. layers",
        "LN + 2x2/2 conv between stages; LN after stem and pooling",
        {"r50": 82.0, "r200": 83.6},
        {"r50": 4.5},
    ),
]
STEP_NAMES = [s.name for s in ROADMAP]
assert tuple(STEP_NAMES) == STEPS, "ablations.ROADMAP and models.STEPS disagree"
BY_NAME = {s.name: s for s in ROADMAP}

# The bars that are variants of a step rather than steps: the recipe bar and the non-adopted kernel sizes.
# variant name -> (step, overrides, Step with the paper's numbers)
VARIANTS = {
    "baseline_classic": (
        "baseline",
        {"train": "classic"},
        Step(
            "baseline_classic",
            "ResNet-50 (original recipe)",
            "90-epoch SGD recipe",
            {"r50": 76.1, "r200": 78.2},
            {"r50": 4.1},
        ),
    ),
    **{
        f"large_kernel_k{k}": (
            "large_kernel",
            {"model.kernel_size": k},
            Step(
                f"large_kernel_k{k}",
                f"kernel sz. → {k}",
                f"depthwise kernel {k}",
                {"r50": t50, "r200": t200},
                {"r50": g},
                adopted=False,
            ),
        )
        for k, t50, t200, g in [(5, 80.4, 82.3, 4.1), (9, 80.6, 82.3, 4.2), (11, 80.5, 82.2, 4.3)]
    },
}
# Reference architectures shown beside the roadmap.
SWIN = {"r50": ("Swin-T", 81.3, 4.5), "r200": ("Swin-B", 83.5, 15.4)}
# GFLOPs of every r50 bar to two decimals, exactly as printed in the paper's Table 10 (appendix C, "Detailed results
# for modernizing a ResNet-50", arXiv 2201.03545v2; Fig. 2 shows the same numbers to one decimal). Two are misprints,
# see TABLE10_MISPRINTS. tests/test_complexity.py pins round(gflops, 2) of every step to these.
TABLE10_GFLOPS = {
    "baseline_classic": 4.09,  # "ResNet-50 (PyTorch)"
    "baseline": 4.09,  # "ResNet-50 (enhanced recipe)"
    "stage_ratio": 4.53,
    "patchify_stem": 4.42,
    "depthwise_conv": 2.35,
    "increase_width": 5.27,
    "inverted_bottleneck": 4.64,  # "inverting dimensions"
    "move_up_dwconv": 4.07,
    "large_kernel_k5": 4.10,
    "large_kernel": 4.15,  # "kernel size -> 7"
    "large_kernel_k9": 4.21,
    "large_kernel_k11": 4.29,
    "gelu": 4.15,
    "fewer_activations": 4.15,
    "fewer_norms": 4.15,
    "bn_to_ln": 4.46,  # misprint
    "separate_downsampling": 4.49,  # misprint ("separate d.s. conv (ConvNeXt-T)")
}
TABLE10_SWIN_T_GFLOPS = 4.50
# step -> (Table 10's printed GFLOPs, the architecture's). BN->LN changes no conv or linear layer, so it keeps
# fewer_norms' 4.15 (Fig. 2: 4.2, not 4.5); ConvNeXt-T is 4.46 (torchvision's 4.456, Fig. 2 and Table 1: 4.5).
TABLE10_MISPRINTS = {"bn_to_ln": (4.46, 4.15), "separate_downsampling": (4.49, 4.46)}


def table10_gflops(name: str) -> float | None:
    """Table 10's two-decimal GFLOPs of a step or variant (r50), its misprints replaced by the architecture's value."""
    if name in TABLE10_MISPRINTS:
        return TABLE10_MISPRINTS[name][1]
    return TABLE10_GFLOPS.get(name)


def table10_gflops_gain(step: str) -> float | None:
    """GFLOPs `step` adds on the paper's r50 roadmap (Table 10, misprints corrected); None for baseline or unknowns."""
    if step not in STEPS or step == STEPS[0]:
        return None
    now, before = table10_gflops(step), table10_gflops(STEPS[STEPS.index(step) - 1])
    return None if now is None or before is None else now - before


def paper(name: str) -> Step:
    """The Step (with the paper's numbers) for a step or variant name."""
    return BY_NAME.get(name) or VARIANTS[name][2]


# A finished run whose final top-1 is at most COLLAPSE_FACTOR x chance (100 / its classes) has collapsed: it learned
# nothing (e.g. a constant prediction, train loss stuck at ln(classes)), as two runs of the factorial sweep did. The
# trainer warns of it and the factorial analysis leaves such runs out of its fit. 1.5x chance sits far below any
# proxy model that trained (the worst measured is 8x chance) and above a collapse's exact chance level.
COLLAPSE_FACTOR = 1.5


def at_chance(top1: float | None, num_classes: int | None) -> bool:
    """Whether a top-1 (%) is at most COLLAPSE_FACTOR x chance for num_classes classes (False if either is unknown)."""
    if top1 is None or not num_classes or top1 != top1:  # top1 != top1: NaN
        return False
    return top1 <= COLLAPSE_FACTOR * 100 / num_classes
