"""Class subsets (data.classes), fine-tuning as a run (pretrained= a run folder or a file, finetune.*), and the
mistakes around them as one paragraph each. Every run here is in-process on tiny synthetic data."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ("step=separate_downsampling", "data=synthetic", "profile=smoke", "max_steps=2", "logger=none",
         "data.synthetic_size=160", "data.img_size=16", "train.batch_size=16")  # fmt: skip
PAPER = {"params": 1, "gflops": 1.0, "gflops_total": 1.0, "activations_m": 1.0}  # complexity is not tested here


@pytest.fixture
def quick(monkeypatch):
    """The complexity counts (fvcore: seconds per new model at paper scale) stubbed: these tests are about weights."""
    import ablations.train as T

    monkeypatch.setattr(T, "_paper_complexity", lambda pcfg: dict(PAPER))
    monkeypatch.setattr(T, "complexity", lambda model, img_size: dict(PAPER))


PRE = ("data.classes=[0,1,2,3,4]", "model.head=fastai_convnext", "model.head_hidden=32")  # the shared pretrain


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    """One pretrain run (classes 0-4, the fastai_convnext head) that the fine-tuning tests start from."""
    from hydra import compose, initialize_config_dir

    import ablations.train as T

    run = tmp_path_factory.mktemp("pretrain") / "pre"
    with pytest.MonkeyPatch.context() as mp, initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        mp.setattr(T, "_paper_complexity", lambda pcfg: dict(PAPER))
        mp.setattr(T, "complexity", lambda model, img_size: dict(PAPER))
        T.train(compose("config", overrides=[*SMOKE, *PRE]), str(run))
    return run


def _train(compose_cfg, run_dir, *overrides):
    from ablations.train import train

    return train(compose_cfg(*SMOKE, *overrides), str(run_dir))


def _ck(run_dir):
    return torch.load(run_dir / "last.pt", weights_only=True)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- data.classes
def test_classes_keep_and_relabel_fashion_mnist(compose_cfg, fmnist_dir):
    from ablations.data import Data, load_tensors

    full = load_tensors(compose_cfg(f"data.root={fmnist_dir}", "profile=smoke").data, "train")
    cfg = compose_cfg(f"data.root={fmnist_dir}", "profile=smoke", "data.classes=[7,2,5]")
    part = load_tensors(cfg.data, "train")
    assert len(part) == sum(int((full.labels == k).sum()) for k in (7, 2, 5))
    for new, old in enumerate([7, 2, 5]):  # relabelled by position, images in their original order
        assert torch.equal(part.images[part.labels == new], full.images[full.labels == old])
    data = Data(cfg, torch.device("cpu"), 0, 1, 8)
    assert data.num_classes == 3 and set(data.test.labels.tolist()) == {0, 1, 2}


def test_classes_of_synthetic_data(compose_cfg):
    from ablations.data import load_tensors

    full = load_tensors(compose_cfg("data=synthetic").data, "test")
    part = load_tensors(compose_cfg("data=synthetic", "data.classes=[3,1]").data, "test")
    assert torch.equal(part.images[part.labels == 0], full.images[full.labels == 3])
    assert torch.equal(part.images[part.labels == 1], full.images[full.labels == 1])


def test_classes_of_an_image_folder_by_name_or_index(tmp_path, compose_cfg):
    from test_train import _png_folder

    from ablations.data import Data, image_folder
    from models import ConfigError

    _png_folder(tmp_path, ["cat", "dog", "fish"], per_class=2)
    for chosen in ("[fish,cat]", "[2,0]"):
        cfg = compose_cfg("data=imagefolder", f"data.root={tmp_path}", "data.img_size=32", "data.workers=0",
                          f"data.classes={chosen}", "train.batch_size=2", "train.mixup=0")  # fmt: skip
        for split in ("train", "val"):
            ds = image_folder(cfg.data, split)
            assert ds.classes == ["fish", "cat"] and sorted(set(ds.targets)) == [0, 1] and len(ds) == 4
            assert all(("/fish/" in path) == (label == 0) for path, label in ds.samples)
        assert Data(cfg, torch.device("cpu"), 0, 1, 2).num_classes == 2  # the model gets 2 outputs
    cfg = compose_cfg("data=imagefolder", f"data.root={tmp_path}", "data.classes=[fish,zebra,7]")
    with pytest.raises(ConfigError, match=r"'zebra', 7 not a class of .*train, whose classes are its folders \(or "
                       r"their indices 0..2\): cat, dog, fish"):  # fmt: skip
        image_folder(cfg.data, "train")


# ---------------------------------------------------------------------------------------------- mistakes
@pytest.fixture(scope="module")
def preflight_cfg():
    """step=gelu profile=smoke composed once with its hydra node, as the pre-flight callback gets it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["step=gelu", "profile=smoke"], return_hydra_config=True)


@pytest.fixture
def r200_run(tmp_path):
    """A run folder of the other regime (only its config.yaml is read before anything starts)."""
    run = tmp_path / "r200run"
    run.mkdir()
    OmegaConf.save(OmegaConf.create({"step": "gelu", "regime": {"name": "r200"}, "model": {}}), run / "config.yaml")
    (run / "last.pt").write_bytes(b"")
    return run


@pytest.mark.parametrize(
    "overrides,expect",
    [
        (("model.head=mlp",), "unknown model.head 'mlp'; valid choices: linear, norm_linear, fastai, fastai_convnext"),
        (
            ("finetune.freeze_epochs=2", "train.epochs=2", "pretrained=x.pt"),
            "finetune.freeze_epochs=2 leaves no epoch to train the whole model in train.epochs=2",
        ),
        (("finetune.freeze_epochs=1", "train.epochs=2"), "finetune.freeze_epochs=1 freezes a body that nothing "),
        (("finetune.train_norm=true", "pretrained=x.pt"), "but nothing is frozen: set finetune.freeze_epochs (e.g. 1)"),
        (
            ("data.classes=[0,10,-1]",),
            "data.classes=[0, 10, -1]: 10, -1 not a class of data=fashion_mnist, whose "
            "classes are the label numbers 0..9",
        ),
        (("data.classes=[3,1,3]",), "data.classes=[3, 1, 3] lists 3 more than once; each class may appear once"),
        (("data.classes=[]",), "data.classes=[] keeps no class"),
        (("pretrained=R200",), "pretrained=R200 is a run of regime=r200, this run is regime=r50: its weights belong"),
        (("pretrained=R200/..",), "is a folder but not a run folder of this project (it has no last.pt)"),
        (("pretrained=R200/../nothing",), "/nothing does not exist: give a run folder of this project"),
    ],
    ids=[
        "head",
        "freeze",
        "freeze-alone",
        "train-norm-alone",
        "outside",
        "twice",
        "empty",
        "regime",
        "not-a-run",
        "missing",
    ],
)
def test_mistakes_are_one_paragraph_before_anything_is_made(tmp_path, preflight_cfg, capsys, r200_run, overrides,
                                                            expect):  # fmt: skip
    from ablations.run_folder import PreflightCallback

    cfg = copy.deepcopy(preflight_cfg)  # composed once; the overrides set as Hydra would have set them
    for override in (*overrides, f"hydra.run.dir={tmp_path / 'run'}"):
        key, value = override.replace("R200", str(r200_run)).split("=", 1)
        OmegaConf.update(cfg, key, yaml.safe_load(value), merge=False)
    expect = expect.replace("R200", str(r200_run))
    with pytest.raises(SystemExit) as e:
        PreflightCallback().on_run_start(cfg)  # what run_ablation.py's Hydra callback does before the folder
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert expect in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_a_pretrained_run_of_another_body_is_refused(tmp_path, compose_cfg, quick, pretrained_run):
    from models import ConfigError

    with pytest.raises(ConfigError, match=re.escape("is a run of another body (model.kernel_size: 7 -> 5)")):
        _train(compose_cfg, tmp_path / "ft", f"pretrained={pretrained_run}", "model.kernel_size=5")


# ---------------------------------------------------------------------------------------------- fine-tuning
FT = ("data.classes=[5,6,7,8,9]", "model.head=fastai_convnext", "model.head_hidden=32", "finetune.freeze_epochs=1",
      "train.epochs=2", "finetune.layer_decay=0.7", "finetune.lr=1e-3")  # fmt: skip


class Killed(Exception):
    pass


def _train_then_die(monkeypatch, compose_cfg, run_dir, *overrides) -> None:
    """Train until the first checkpoint (the end of epoch 1 here) is written, then die as a killed process."""
    import ablations.train as T

    save = T.atomic_save

    def save_then_die(obj, path):
        save(obj, path)
        raise Killed

    monkeypatch.setattr(T, "atomic_save", save_then_die)
    with pytest.raises(Killed):
        _train(compose_cfg, run_dir, *overrides)
    monkeypatch.setattr(T, "atomic_save", save)


def test_finetune_freezes_then_trains_all_and_resumes_exactly(tmp_path, compose_cfg, quick, monkeypatch,
                                                              pretrained_run):  # fmt: skip
    """Pretrain on classes 0-4, fine-tune on 5-9 from the run folder: the frozen epoch moves only the head, the
    classifier is new, layer decay and the fine-tune's lr reach the optimizer; a run killed right after its frozen
    epoch resumes to the same weights, optimizer state and metrics as the straight run."""
    import ablations.train as T

    pre = tmp_path / "pre"
    shutil.copytree(pretrained_run, pre)  # this test moves it away
    straight = _train(compose_cfg, tmp_path / "straight", f"pretrained={pre}", *FT)
    assert straight["num_classes"] == 5 and straight["epochs"] == 2
    assert straight["head"] == "fastai_convnext" and straight["pretrained"] == str(pre)

    _train_then_die(monkeypatch, compose_cfg, tmp_path / "resumed", f"pretrained={pre}", *FT)
    old, frozen = _ck(pre)["model"], _ck(tmp_path / "resumed")
    assert frozen["epoch"] == 1
    for k, v in frozen["model"].items():
        if k.startswith("head."):
            assert not torch.equal(v, old[k]), k  # trained (the classifier is new: the classes are others)
        elif "running" not in k and "num_batches" not in k:  # BatchNorm statistics follow the batches
            assert torch.equal(v, old[k]), k  # the body is frozen
    groups = frozen["optimizer"]["param_groups"]
    assert len({g["lr_scale"] for g in groups}) > 3 and max(g["lr_scale"] for g in groups) == 1.0
    cfg = compose_cfg(*SMOKE, *FT)
    assert {g["initial_lr"] for g in groups} == {T.lr_for(cfg.train, 1e-3)} != {T.lr_for(cfg.train)}
    head_lr = next(g["lr"] for g in groups if g["lr_scale"] == 1.0)  # metrics log the schedule's lr, not the stem's
    assert _metrics(tmp_path / "straight")[0]["lr"] == head_lr > min(g["lr"] for g in groups)

    pre.rename(tmp_path / "moved")  # a resumed fine-tune restores its own last.pt: the pretrained run is not read
    _train(compose_cfg, tmp_path / "resumed", f"pretrained={pre}", *FT)
    a, b = _ck(tmp_path / "straight"), _ck(tmp_path / "resumed")
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert not torch.equal(a["model"]["stem.conv.weight"], old["stem.conv.weight"])  # then everything trains
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys() and all(state_a[i]["exp_avg"].equal(state_b[i]["exp_avg"]) for i in state_a)
    strip = [{k: v for k, v in r.items() if k not in ("epoch_s", "img_per_s")} for r in _metrics(tmp_path / "straight")]
    assert strip == [{k: v for k, v in r.items() if k not in ("epoch_s", "img_per_s")}
                     for r in _metrics(tmp_path / "resumed")]  # fmt: skip


def test_train_norm_keeps_the_frozen_bodys_norm_layers_training(tmp_path, compose_cfg, quick, monkeypatch,
                                                                 pretrained_run):  # fmt: skip
    """finetune.train_norm (fastai's train_bn): in the frozen epoch the body's norm weights move, its convs do not;
    without it nothing of the body moves (the test above)."""
    no_decay = [o for o in FT if not o.startswith("finetune.layer_decay")]  # the stem's lr x 0.7**n: below 1 ulp
    _train_then_die(monkeypatch, compose_cfg, tmp_path / "ft", f"pretrained={pretrained_run}", *no_decay,
                    "finetune.train_norm=true")  # fmt: skip
    old, frozen = _ck(pretrained_run)["model"], _ck(tmp_path / "ft")
    assert frozen["epoch"] == 1
    norms = {
        k for k in frozen["model"] if k.endswith((".weight", ".bias")) and ".norm" in k and not k.startswith("head.")
    }
    assert norms, sorted(frozen["model"])[:20]
    for k, v in frozen["model"].items():
        if k.startswith("head.") or "running" in k or "num_batches" in k:
            continue
        if k in norms:
            assert not torch.equal(v, old[k]), k  # the norm layers of the frozen body trained
        else:
            assert torch.equal(v, old[k]), k  # everything else of the body stayed


def test_the_classifier_is_kept_only_for_the_same_classes(compose_cfg, pretrained_run):
    """pretrained= a run of the same data and classes continues its classifier; a run of other classes or another
    head gets a new one, and another head's layers are new too."""
    from ablations.finetune import load_for_finetune
    from ablations.train import model_config
    from models import RoadmapNet

    old = _ck(pretrained_run)["model"]
    cases = [((), "loaded", "loaded"), (("data.classes=[5,6,7,8,9]",), "loaded", "new"),
             (("model.head=fastai",), "new", "new"), (("model.head=linear",), "none", "new")]  # fmt: skip
    base = compose_cfg(*SMOKE, *PRE, f"pretrained={pretrained_run}")
    for extra, head, fc in cases:
        cfg = copy.deepcopy(base)
        for key, value in (o.split("=", 1) for o in extra):
            OmegaConf.update(cfg, key, yaml.safe_load(value), merge=False)
        model = RoadmapNet(model_config(cfg), num_classes=5)
        done = load_for_finetune(cfg, model)
        assert (done["head"], done["classifier"]) == (head, fc), extra
        new = model.state_dict()
        assert torch.equal(new["stages.3.blocks.2.body.conv_pw1.conv.weight"], old[
            "stages.3.blocks.2.body.conv_pw1.conv.weight"])  # fmt: skip
        assert torch.equal(new["head.fc.weight"], old["head.fc.weight"]) == (fc == "loaded")


def test_a_timm_checkpoint_fine_tunes_with_a_new_classifier(tmp_path, compose_cfg, quick):
    """A foreign file (timm's ConvNeXt, 1000 classes) into a 5-class run: body and head norm loaded, classifier new
    (before fine-tuning existed a run's pretrained= needed the run's class count)."""
    import timm

    from ablations.finetune import load_for_finetune
    from ablations.train import model_config
    from models import RoadmapNet

    ref = timm.create_model("convnext_tiny", dims=(12, 24, 48, 96), num_classes=1000)  # the 1/8-width ConvNeXt-T
    torch.save(ref.state_dict(), tmp_path / "convnext.pth")
    overrides = (f"pretrained={tmp_path / 'convnext.pth'}", "data.classes=[0,1,2,3,4]", "model.stem_stride=4",
                 "data.img_size=32")  # fmt: skip
    cfg = compose_cfg(*SMOKE, *overrides)
    model = RoadmapNet(model_config(cfg), num_classes=5)
    assert load_for_finetune(cfg, model) == {"format": "timm convnext", "head": "loaded", "classifier": "new"}
    assert torch.equal(model.stem.conv.weight, ref.stem[0].weight)
    assert torch.equal(model.head.norm.weight, ref.head.norm.weight) and model.head.fc.weight.shape == (5, 96)
    s = _train(compose_cfg, tmp_path / "ft", *overrides, "train.epochs=2", "finetune.freeze_epochs=1", "max_steps=1")
    assert s["num_classes"] == 5 and s["status"] == "finished"


def test_a_run_folder_from_before_these_keys_still_resumes(tmp_path, compose_cfg):
    """config.yaml and checkpoints written before model.head / model.head_hidden / data.classes / finetune existed
    compare equal to a default run (the keys count as their schema defaults); a folder of another head does not."""
    from ablations.run_folder import RunFolderError, check_checkpoint, plain, prepare

    cfg = compose_cfg("step=gelu", "profile=smoke")
    old = plain(cfg)
    for node, key in (("model", "head"), ("model", "head_hidden"), ("data", "classes")):
        old[node].pop(key)
    old.pop("finetune")
    OmegaConf.save(OmegaConf.create(old), tmp_path / "config.yaml")
    assert prepare(cfg, str(tmp_path)) is None  # to be trained or resumed, not refused
    check_checkpoint({"config": old}, cfg, "last.pt")
    check_checkpoint({"model_config": old["model"]}, cfg, "last.pt")  # the oldest checkpoints: a model config only
    with pytest.raises(RunFolderError, match=re.escape("model.head: None -> 'fastai'")):
        prepare(compose_cfg("step=gelu", "profile=smoke", "model.head=fastai"), str(tmp_path))


def test_the_heads_sweep_fine_tunes_each_pretrained_run(compose_cfg):
    """+sweep=heads (stage 1) and +sweep=heads_finetune (stage 2) sweep the same bodies x heads, on classes 0-4 then
    5-9, and every stage-2 job's pretrained= is the folder its stage-1 job writes."""
    from models.heads import HEADS

    pre, ft = (OmegaConf.load(ROOT / f"conf/sweep/{name}.yaml") for name in ("heads", "heads_finetune"))
    for sweep in (pre, ft):
        params = sweep.hydra.sweeper.params
        assert params.step == "baseline,separate_downsampling" and params["model.head"].split(",") == list(HEADS)
    for step, head in (("baseline", "fastai"), ("separate_downsampling", "norm_linear")):  # (each compose: 0.25 s)
        a = compose_cfg("+sweep=heads", f"step={step}", f"model.head={head}", return_hydra_config=True)
        b = compose_cfg("+sweep=heads_finetune", f"step={step}", f"model.head={head}", return_hydra_config=True)
        assert list(a.data.classes) == [0, 1, 2, 3, 4] and list(b.data.classes) == [5, 6, 7, 8, 9]
        assert b.pretrained == f"{a.hydra.sweep.dir}/{a.hydra.sweep.subdir}" and a.pretrained is None
        assert b.finetune.freeze_epochs == 1 and a.finetune.freeze_epochs == 0


@pytest.mark.slow
def test_a_frozen_then_unfrozen_fine_tune_trains_under_ddp_like_one_process(tmp_path):
    """torchrun, 2 processes: the body frozen in epoch 1, then the whole model in epoch 2. DDP registers only the
    parameters that need gradients when it is built, so the unfreeze must rebuild it; without that the body's
    gradients of epoch 2 would stay per process and the weights would leave the single-process run's."""
    from ddp_helpers import DDP_RUN, _assert_same_training, _run, _torchrun, free_port

    pre = tmp_path / "pre"
    out = _run([*DDP_RUN, "train.epochs=1", f"hydra.run.dir={pre}"])
    assert out.returncode == 0, out.stderr[-3000:]
    ft = [*DDP_RUN, f"pretrained={pre}", "finetune.freeze_epochs=1"]
    one = _run([*ft, f"hydra.run.dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run([*ft, f"hydra.run.dir={tmp_path / 'two'}"], _torchrun(2, free_port()))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "body unfrozen" in two.stderr + two.stdout
    _assert_same_training(tmp_path / "one", tmp_path / "two")
    body = [k for k in torch.load(pre / "last.pt", weights_only=True)["model"] if not k.startswith("head.")]
    before, after = (torch.load(d / "last.pt", weights_only=True)["model"] for d in (pre, tmp_path / "two"))
    assert any(not torch.equal(before[k], after[k]) for k in body)  # epoch 2 trained the body
