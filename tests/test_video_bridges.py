"""`python -m studies.video_bridges --size=small` end to end, one seed: the video world's clip features (S x F per
clip, frame by frame), both bridges and both arms trained with their recipes' losses and evaluated, the results
files with every row. The small size is too small for any model to beat the blind baseline reliably: it checks
the plumbing, not the answer."""
import json
import math
import os

import numpy as np
import pytest

from studies import video_bridges

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


@pytest.mark.slow
def test_video_bridges_small(tmp_path, monkeypatch, quickstart_in_process):
    monkeypatch.chdir(ROOT)  # the study names its scripts and configs from the repository root
    data, out = tmp_path / "data", tmp_path / "out"
    runs, arms, paired, blind = video_bridges.main("small", seeds=[0], data=str(data), out=str(out))

    # one feature per frame for every training and test clip, as data.py and eval.py read name.npy for name.mp4
    clips = [a["video"] for f in ("train.json", "test_captions.json") for a in json.loads((data / f).read_text())]
    n_frames = json.loads((data / "world.json").read_text())["config"]["n_frames"]
    for name in clips:
        features = np.load(data / "features" / name.replace(".mp4", ".npy"))
        assert features.shape == (n_frames, 64) and np.isfinite(features).all(), (name, features.shape)
    # the shape moves: its frames' pooled features differ (were they equal, no bridge could tell the direction)
    assert not np.allclose(features[0], features[-1], atol=1e-3)

    # each recipe trains the losses it says, all finite; the BERT bridge's baseline has no stage 1
    results = json.loads((out / "results.json").read_text())
    dirs = results["dirs"]
    expected_stage1 = {"qformer | BLIP-2 | seed 0": {"itc", "itm", "itg"},
                       "qformer | BLIP-2 + P-Former | seed 0": {"itc", "itm", "itg", "align"},
                       "bert | BLIP-2 + P-Former | seed 0": {"align"}}
    for key, d in dirs.items():
        stage1 = os.path.join(d, "stage1")
        if key == "bert | BLIP-2 | seed 0":
            assert not os.path.exists(stage1), key
        else:
            records = log(stage1)
            assert {"itc", "itm", "itg", "align"} & set(records[-1]) == expected_stage1[key], (key, records[-1])
            assert all(math.isfinite(r["loss"]) for r in records), (key, records)
        records = log(os.path.join(d, "stage2"))
        assert all(math.isfinite(r["loss"]) for r in records), (key, records)
        assert ("align" in records[-1]) == (key == "qformer | BLIP-2 + P-Former | seed 0"), (key, records[-1])

    # every bridge and arm scored on every question type, and the paired difference is theirs
    for bridge in ("qformer", "bert"):
        for arm in ("BLIP-2", "BLIP-2 + P-Former"):
            scores = results["runs"][bridge][arm]["0"]
            for metric in video_bridges.QA_TYPES:
                assert 0 <= scores[metric] <= 100, (bridge, arm, metric, scores)
            assert math.isfinite(scores["CIDEr"]), scores
        for metric in video_bridges.QA_TYPES + ["CIDEr"]:
            difference = results["pformer_minus_blip2"][bridge][metric]
            assert difference == pytest.approx([runs[bridge]["BLIP-2 + P-Former"][0][metric]
                                                - runs[bridge]["BLIP-2"][0][metric], 0.0]), (bridge, metric)
    table = (out / "results.md").read_text()
    for row in ("| qformer | BLIP-2 |", "| qformer | BLIP-2 + P-Former |", "| bert | BLIP-2 |",
                "| bert | BLIP-2 + P-Former |", "| qformer |", "| bert |", "| blind:"):
        assert row in table, row


@pytest.mark.parametrize("kwargs, named", [(dict(size="medium"), "--size=medium"),
                                           (dict(seeds=[]), "--seeds=[]"),
                                           (dict(world={"n_trian": 10}), "'n_trian'"),
                                           (dict(steps={"stage3": 10}), "'stage3'")])
def test_bad_options_are_named(tmp_path, kwargs, named):
    """A wrong option stops the study at once, before anything is built, with a line naming it."""
    with pytest.raises(SystemExit, match=named.replace("[", r"\[").replace("]", r"\]")):
        video_bridges.main(**{"size": "small", "data": str(tmp_path / "data"), "out": str(tmp_path / "out"),
                              **kwargs})
    assert not (tmp_path / "data").exists()
