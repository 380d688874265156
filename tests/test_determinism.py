"""The same seed gives the same numbers: building the quick start's world twice gives the same backbones, byte for
byte, and so does building it from backbones shipped by `world.py --quickstart --ship=DIR` (the video world's too); a
stage-1 run (whose ITM draws some negative images twice) repeated gives the same weights, bit for bit, on every
thread count torch uses."""
import os

import pytest
import torch

import world
from scripts import run_script, train_tiny

WORLD = dict(n_train=16, n_test=4, n_text=60, vit_steps=20, llm_width=64, llm_layers=2, llm_steps=40,
             llm_questions=2)


pytestmark = pytest.mark.slow  # whole worlds and training runs, each built twice


def test_world_builds_twice_the_same_and_ships(tmp_path):
    first = run_script("world.py", "--quickstart", f"--out={tmp_path}/a", *[f"--{k}={v}" for k, v in WORLD.items()],
                       f"--ship={tmp_path}/shipped")
    assert "pretrained" in first.stdout
    run_script("world.py", "--quickstart", f"--out={tmp_path}/b", "--pretrain=1",
               *[f"--{k}={v}" for k, v in WORLD.items()])
    a, b = world.file_hashes(f"{tmp_path}/a"), world.file_hashes(f"{tmp_path}/b")
    assert a == b
    # a world with these settings takes the shipped LLM and ViT instead of pretraining them
    cfg = {**world.QUICKSTART_WORLD, **WORLD}
    assert world.shipped_backbones(cfg, f"{tmp_path}/shipped") == f"{tmp_path}/shipped"
    assert world.shipped_backbones({**cfg, "seed": cfg["seed"] + 1}, f"{tmp_path}/shipped") is None
    world.build_quickstart_world(f"{tmp_path}/c", shipped=f"{tmp_path}/shipped", **WORLD)
    assert world.file_hashes(f"{tmp_path}/c") == a
    for name in ("train.json", "test_vqa.json", "corpus_qa.txt"):
        assert open(f"{tmp_path}/a/{name}").read() == open(f"{tmp_path}/c/{name}").read()


def test_stage1_twice_gives_the_same_weights(tiny_world, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # where summation order could change with the scheduling of threads
    try:
        weights = []
        for run in ("a", "b"):
            train_tiny(1, tiny_world, f"{tmp_path}/{run}", "--max_steps=6", "--batch_size=32", "--log_interval=1",
                       "--ckpt_interval=6")
            weights.append(torch.load(f"{tmp_path}/{run}/ckpt.pt", weights_only=True)["model"])
    finally:
        torch.set_num_threads(threads)
    assert weights[0].keys() == weights[1].keys()
    different = [k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])]
    assert not different, different
    assert os.path.getsize(f"{tmp_path}/a/log.jsonl") > 0



def test_video_world_ships_its_backbones(tmp_path, capsys):
    """`python -m studies.video_world --ship=DIR`'s path at a tiny size: the world's pretrained LLM and ViT, shipped,
    make the same world again; another setting pretrains its own. The repository ships the tests' world's."""
    from studies import video_world as vw

    tiny = dict(n_train=12, n_test=4, n_text=40, llm_steps=20, vit_steps=10)
    vw.build_video_world(f"{tmp_path}/a", pretrain=True, **tiny)
    world.save_shipped_backbones(f"{tmp_path}/a", {**vw.VIDEO_WORLD, **tiny}, f"{tmp_path}/shipped")
    capsys.readouterr()
    vw.build_video_world(f"{tmp_path}/b", shipped=f"{tmp_path}/shipped", **tiny)
    assert f"the LLM and the ViT from {tmp_path}/shipped" in capsys.readouterr().out
    assert world.file_hashes(f"{tmp_path}/b") == world.file_hashes(f"{tmp_path}/a")
    assert open(f"{tmp_path}/a/test_qa.json").read() == open(f"{tmp_path}/b/test_qa.json").read()
    other = {**vw.VIDEO_WORLD, **tiny, "n_train": 13}  # the text clips follow the pairs' clips: another corpus
    assert world.shipped_backbones(other, f"{tmp_path}/shipped", vw.VIDEO_BACKBONE_SETTINGS) is None
    small = {**vw.VIDEO_WORLD, **vw.STUDY_SIZES["small"]["world"]}
    assert world.shipped_backbones(small, vw.VIDEO_SHIPPED, vw.VIDEO_BACKBONE_SETTINGS) == vw.VIDEO_SHIPPED
