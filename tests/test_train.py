"""train_stage1.py and train_stage2.py end to end on the tiny world: they run, learn, resume exactly, and fail
clearly on bad input."""

import json
import os

import pytest
import torch

from checkpoints import MODEL_SIZES
from scripts import read_log, run_script, tiny_data_args, tiny_sizes, train_tiny


def run(stage, w, out_dir, *args, ok=True):
    return train_tiny(stage, w, out_dir, *args, ok=ok)


def log(out_dir):
    return read_log(out_dir)


def weights(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["model"]


def test_stage1_then_stage2_learn(tiny_world, tmp_path):
    s1, s2 = str(tmp_path / "s1"), str(tmp_path / "s2")
    p = run(1, tiny_world, s1, "--max_steps=40", "--lr_decay_steps=40", "--log_interval=5", "--eval_interval=20")
    assert "GFLOP per sample" in p.stdout  # counted on the first step, for MFU on GPUs
    train = [r for r in log(s1) if "loss" in r]
    assert {"itc", "itm", "itg", "lr", "samples_per_sec", "skipped"} <= set(train[0])
    assert train[-1]["loss"] < 0.85 * train[0]["loss"], (train[0], train[-1])
    assert train[-1]["itg"] < 0.7 * train[0]["itg"]
    assert any("val_loss" in r for r in log(s1))
    ckpt = torch.load(os.path.join(s1, "ckpt.pt"), weights_only=True)
    assert ckpt["stage"] == 1 and ckpt["step"] == 40
    assert not any(k.startswith("visual.") for k in ckpt["model"]), "frozen ViT weights saved"
    run(2, tiny_world, s2, f"--stage1_ckpt={s1}/ckpt.pt", "--max_steps=40", "--lr_decay_steps=40",
        "--log_interval=5")
    lm = [r["lm"] for r in log(s2) if "lm" in r]
    assert lm[-1] < 0.8 * lm[0], lm
    sd = weights(s2)
    assert not any(k.startswith(("visual.", "llm.")) for k in sd), "frozen weights saved"
    # stage 2 started from stage 1: a query-path weight that stage 1 trained is carried over, not re-drawn
    start = torch.load(os.path.join(s1, "ckpt.pt"), weights_only=True)["model"]["qformer.query_tokens"]
    assert (sd["qformer.query_tokens"] - start).abs().max() < 0.1


def test_stage2_takes_its_sizes_from_the_stage1_checkpoint(tiny_world, tmp_path):
    """config/stage2_tiny.py names no size: the run builds the model that the same run with stage 1's sizes typed
    out builds (same weights, same loss); a size that contradicts the checkpoint stops it, naming both values."""
    s1 = str(tmp_path / "s1")
    run(1, tiny_world, s1, "--max_steps=1", "--eval_interval=100")
    common = [f"--stage1_ckpt={s1}/ckpt.pt", "--max_steps=1", "--log_interval=1", "--eval_interval=100"]
    run(2, tiny_world, str(tmp_path / "taken"), *common)
    run(2, tiny_world, str(tmp_path / "typed"), *common, *tiny_sizes())
    taken, typed = (torch.load(os.path.join(tmp_path, d, "ckpt.pt"), weights_only=True) for d in ("taken", "typed"))
    assert {k: taken["config"][k] for k in MODEL_SIZES} == {k: typed["config"][k] for k in MODEL_SIZES}
    assert taken["config"]["hidden_size"] == 64 and taken["config"]["vit_kwargs"]["embed_dim"] == 64
    assert taken["model"].keys() == typed["model"].keys()
    for k in taken["model"]:
        assert torch.equal(taken["model"][k], typed["model"][k]), k
    assert log(tmp_path / "taken")[0]["loss"] == log(tmp_path / "typed")[0]["loss"]
    p = run(2, tiny_world, str(tmp_path / "wrong"), *common, "--num_query_tokens=4", ok=False)
    assert p.stderr.strip().splitlines()[-1].endswith(
        f"config key 'num_query_tokens' = 4 contradicts {s1}/ckpt.pt, whose model has num_query_tokens = 8: leave "
        f"num_query_tokens out to take it from there")
    p = run(2, tiny_world, str(tmp_path / "typo"), *common, "--hidden_size=64.0", ok=False)
    assert "'hidden_size' expects int, got 64.0" in p.stderr.strip().splitlines()[-1]


def test_tar_shards(tiny_world, tmp_path):
    out = str(tmp_path / "shards")
    run_script("train_stage1.py", "config/stage1_tiny.py", *tiny_data_args(tiny_world, shards=True),
               f"--bert={tiny_world}/bert", f"--out_dir={out}", "--max_steps=6", "--log_interval=2",
               "--eval_interval=100")
    rows = [r for r in log(out) if "loss" in r]
    assert len(rows) == 3 and all(r["loss"] == r["loss"] for r in rows)
    assert rows[-1]["epoch"] >= 2  # 32 samples / batch 16: the stream wrapped around into new epochs


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_reaches_the_same_weights(tiny_world, tmp_path, stage):
    """Stopped at step 3 (mid-epoch: 2 batches per epoch) and resumed to 6 == straight to 6."""
    common = ["--lr_decay_steps=6", "--warmup_steps=2", "--log_interval=1", "--eval_interval=100",
              "--ckpt_interval=100", "--dropout=0.1"]
    if stage == 2:
        s1 = str(tmp_path / "s1")
        run(1, tiny_world, s1, "--max_steps=2", "--lr_decay_steps=2")
        common.append(f"--stage1_ckpt={s1}/ckpt.pt")
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run(stage, tiny_world, full, "--max_steps=6", *common)
    run(stage, tiny_world, part, "--max_steps=3", *common)
    assert torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)["step"] == 3
    run(stage, tiny_world, part, "--max_steps=6", "--init_from=resume", *common)
    a, b = weights(full), weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    losses_full = [r["loss"] for r in log(full) if "loss" in r]
    losses_part = [r["loss"] for r in log(part) if "loss" in r]
    assert losses_part == pytest.approx(losses_full, abs=1e-5)


def write_annotations(path, anns):
    with open(path, "w") as f:
        json.dump(anns, f)
    return path


def test_missing_and_corrupt_images(tiny_world, tmp_path):
    with open(os.path.join(tiny_world, "train.json")) as f:
        anns = json.load(f)
    with open(tmp_path / "broken.jpg", "wb") as f:
        f.write(b"not a jpeg")
    os.symlink(os.path.join(tiny_world, "images"), tmp_path / "images")
    bad = anns[:2] + [{"image": "../broken.jpg", "caption": "a red square"},
                      {"image": "no_such_image.jpg", "caption": "a blue circle"}] + anns[2:]
    ann = write_annotations(str(tmp_path / "bad.json"), bad)
    out = str(tmp_path / "skip")
    p = run(1, tiny_world, out, f"--train_ann=['{ann}']", f"--train_image_roots=['{tmp_path}/images']",
            "--max_steps=4", "--log_interval=2", "--eval_interval=100")
    assert "no_such_image.jpg" in p.stderr and "broken.jpg" in p.stderr
    assert [r for r in log(out) if "skipped" in r][-1]["skipped"] >= 1
    p = run(1, tiny_world, str(tmp_path / "strict"), f"--train_ann=['{ann}']",
            f"--train_image_roots=['{tmp_path}/images']", "--max_steps=4", "--strict_images=True", ok=False)
    assert "no_such_image.jpg" in p.stderr or "broken.jpg" in p.stderr


def test_bad_input_fails_clearly(tiny_world, tmp_path):
    malformed = write_annotations(str(tmp_path / "malformed.json"),
                                  [{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg"}])
    p = run(1, tiny_world, str(tmp_path / "a"), f"--train_ann=['{malformed}']", ok=False)
    last = p.stderr.strip().splitlines()[-1]
    assert "malformed.json" in last and "1" in last, last
    empty = write_annotations(str(tmp_path / "empty.json"), [{"image": "a.jpg", "caption": []}])
    p = run(1, tiny_world, str(tmp_path / "b"), f"--train_ann=['{empty}']", ok=False)
    assert "empty.json" in p.stderr.strip().splitlines()[-1]
    p = run(1, tiny_world, str(tmp_path / "c"), "--batch_sise=4", ok=False)
    assert "unknown config key 'batch_sise' (did you mean 'batch_size'?)" in p.stderr.strip().splitlines()[-1]
    p = run(1, tiny_world, str(tmp_path / "d"), "--max_steps=ten", ok=False)
    assert "'max_steps' expects int" in p.stderr.strip().splitlines()[-1]
    # a checkpoint of the other stage
    s1 = str(tmp_path / "s1")
    run(1, tiny_world, s1, "--max_steps=1", "--eval_interval=100")
    p = run(2, tiny_world, s1, "--init_from=resume", ok=False)
    assert "is a stage-1 checkpoint, expected stage 2" in p.stderr.strip().splitlines()[-1]
    p = run(2, tiny_world, str(tmp_path / "e"), f"--stage1_ckpt={s1}/log.jsonl", ok=False)
    assert "log.jsonl is not a readable torch checkpoint" in p.stderr.strip().splitlines()[-1]


def test_cached_vit_features_train_alike(tiny_world, tmp_path):
    """Without augmentation, a stage-1 run on cached frozen-ViT features logs the losses of a run on images."""
    common = ["--max_steps=6", "--lr_decay_steps=6", "--log_interval=2", "--eval_interval=100", "--augment=False"]
    run(1, tiny_world, str(tmp_path / "images"), *common)
    run(1, tiny_world, str(tmp_path / "cached"), *common, "--cache_vit_features=True")
    a = [r["loss"] for r in log(str(tmp_path / "images")) if "loss" in r]
    b = [r["loss"] for r in log(str(tmp_path / "cached")) if "loss" in r]
    assert len(a) == 3 and a == pytest.approx(b, rel=1e-4, abs=1e-5)
    p = run(1, tiny_world, str(tmp_path / "bad"), "--cache_vit_features=True", ok=False)
    assert "cache_vit_features=True needs augment=False" in p.stderr
