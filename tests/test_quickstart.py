"""quickstart.py end to end at its small size: the world with the shipped backbones (the size changes scenes and steps,
not the backbone settings), P-Former stage 0, stages 1 and 2 with and without P-Former, evaluation, table and
pictures; every stage's loss falls and the captions name what is there; a second run reuses everything. The steps
run in this process (tests/scripts.py), with the arguments the quick start gives them: a new interpreter for each
would cost more than the steps themselves at this size."""

import json

import pytest

import quickstart


def losses(path):
    with open(path) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


@pytest.mark.slow
def test_quickstart_small(tmp_path, quickstart_in_process, capsys):
    quickstart.main("small", data=str(tmp_path / "data"), out=str(tmp_path / "out"))
    out = capsys.readouterr().out
    assert "zero-shot VQA accuracy" in out and "caption CIDEr" in out
    assert "the LLM and the ViT from" in out and "LLM pretraining" not in out  # the shipped ones, nothing pretrained
    o = tmp_path / "out"
    for log in ["pformer", "blip2/stage1", "blip2/stage2", "blip2_pformer/stage1", "blip2_pformer/stage2"]:
        loss = losses(o / log / "log.jsonl")
        assert loss[-1] < 0.9 * loss[0], (log, loss)
    with open(tmp_path / "data" / "test_captions.json") as f:
        scenes = {a["image"]: a["scene"] for a in json.load(f)}
    for run in ["blip2", "blip2_pformer"]:
        with open(o / run / "eval" / "caption_captions.json") as f:
            captions = json.load(f)
        assert len(captions) == len(scenes) and all(c["caption"].strip() for c in captions)
        named = [set(c["caption"].split()) & ({ob["color"] for ob in scenes[c["image_id"]]} |
                                              {ob["shape"] for ob in scenes[c["image_id"]]}) for c in captions]
        # at this size (40 and 100 steps) most captions, not all, name a colour or a shape that is in the scene
        assert sum(map(bool, named)) >= 0.6 * len(captions), (run, captions)
    for f in ["results.md", "results.json", "samples.png", "losses.png"]:
        assert (o / f).stat().st_size > 0
    made = json.loads((o / "results.json").read_text())["provenance"]  # what produced the results, in both files
    assert made["torch"] and made["torch_threads"] >= 1 and f"commit {made['commit']}" in (o / "results.md").read_text()
    # a second run reuses the world, the checkpoints and the evaluations
    quickstart_in_process.clear()
    quickstart.main("small", data=str(tmp_path / "data"), out=str(tmp_path / "out"))
    again = capsys.readouterr().out
    assert quickstart_in_process == ["world + backbones"] and "reusing" in again and again.count("done already") == 5
