"""`python -m studies.video_world --size=small` end to end on the video world (clips of a shape moving left or right,
the direction visible only across frames): stage 2 on 4-frame clips, on single frames, and on 4-frame clips with
P-Former; zero-shot video QA and captions. Every run's loss falls, the 4-frame model tells the direction of motion
well above the single-frame model and the blind baseline, and the P-Former alignment loss falls."""
import json

import pytest

from studies import video_world


def log(path):
    with open(path) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


@pytest.mark.slow
def test_video_world_small(tmp_path, quickstart_in_process, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    results, blind = video_world.main("small", data=str(data), out=str(out))
    assert "QA: direction" in capsys.readouterr().out and (out / "results.md").stat().st_size > 0
    for name, r in results.items():
        losses = [x["loss"] for x in log(f"{r['dir']}/stage2/log.jsonl")]
        assert losses[-1] < 0.9 * losses[0], (name, losses)
    four, one = results["BLIP-2, 4 frames"]["vqa"], results["BLIP-2, 1 frame"]["vqa"]
    guess = blind["answer per question"]["direction"]
    # two directions: a single frame (the first, from a start drawn alike for both) and the blind answer are at 50%
    assert four["direction"] >= one["direction"] + 20 and four["direction"] >= guess + 20, (four, one, guess)
    assert one["direction"] <= 70 and one["color"] >= 80, one  # the single frame sees colours, not motion
    align = [x["align"] for x in log(f"{out}/blip-2_p-former_4frames/stage2/log.jsonl")]
    assert align[-1] < 0.5 * align[0], align
