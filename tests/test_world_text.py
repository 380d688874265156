"""The quick start's LLM settings: the pages it reads (captions first or not) and its layout (OPT or BLOOM), and the
shipped backbones recorded with the settings they were made with."""
import json
import math
import random

import pytest
from transformers import AutoTokenizer

import world
from scripts import run_script

SCENES = [world.random_scene(random.Random(i)) for i in range(200)]


def is_caption(doc, scene):
    return doc in world.scene_captions(scene)


def captions_first(page, scene):
    """Two or three captions, then only questions."""
    kinds = [is_caption(d, scene) for d in page]
    n_captions = sum(kinds)
    return n_captions in (2, 3) and kinds == [True] * n_captions + [False] * (len(page) - n_captions)


def test_pages_with_captions_first_put_every_caption_before_the_questions():
    pages = world.llm_pages(SCENES, random.Random(0), n_questions=6, captions_first=1.0)
    assert all(captions_first(p, s) for s, p in zip(SCENES, pages))
    # the default: one or two captions, the first document a caption, and somewhere a caption after a question
    pages = world.llm_pages(SCENES, random.Random(0), n_questions=6)
    assert all(is_caption(p[0], s) and sum(is_caption(d, s) for d in p) in (1, 2) for s, p in zip(SCENES, pages))
    assert any(is_caption(p[-1], s) for s, p in zip(SCENES, pages))


def test_a_share_of_pages_with_captions_first_mixes_the_two_orders():
    pages = world.llm_pages(SCENES, random.Random(0), n_questions=6, captions_first=0.5)
    first = [captions_first(p, s) for s, p in zip(SCENES, pages)]
    assert 0.35 < sum(first) / len(first) < 0.65  # 200 fair coins: 5 standard deviations either side
    # the other pages are the default's: one or two captions, the first document a caption
    assert all(is_caption(p[0], s) and sum(is_caption(d, s) for d in p) in (1, 2)
               for s, p, f in zip(SCENES, pages, first) if not f)


def test_shipped_backbones_record_their_layout_and_pages():
    assert world.shipped_backbones(world.QUICKSTART_WORLD) == world.SHIPPED
    shipped = world.QUICKSTART_WORLD
    other_layout = next(layout for layout in world.LLM_LAYOUTS if layout != shipped["llm_layout"])
    for other in (dict(llm_layout=other_layout), dict(llm_captions_first=1.0 - shipped["llm_captions_first"]),
                  dict(llm_captions_first=shipped["llm_captions_first"] + 0.1),
                  dict(llm_heads=2 * shipped["llm_heads"])):
        assert world.shipped_backbones({**world.QUICKSTART_WORLD, **other}) is None


@pytest.mark.slow
def test_a_bloom_world_llm_learns_its_pages(tmp_path):
    tiny = dict(n_train=8, n_test=4, n_text=60, vit_steps=10, llm_width=32, llm_layers=2, llm_steps=200, llm_lr=3e-3,
                llm_questions=2, llm_layout="bloom", llm_heads=8, llm_captions_first=1.0)
    world.build_quickstart_world(str(tmp_path), **tiny)
    with open(tmp_path / "llm" / "config.json") as f:
        llm_config = json.load(f)
    assert llm_config["model_type"] == "bloom" and llm_config["n_head"] == 8
    with open(tmp_path / "world.json") as f:
        built = json.load(f)
    vocab = len(AutoTokenizer.from_pretrained(tmp_path / "llm"))
    # from log(vocab), where a random LM starts, to a loss of the pages' few words
    assert built["config"]["llm_layout"] == "bloom" and built["llm_loss"] < 0.5 * math.log(vocab)


@pytest.mark.parametrize("bad, named", [("--llm_layout=gpt2", "llm_layout='gpt2'"),
                                        ("--llm_captions_first=2.0", "llm_captions_first=2.0"),
                                        ("--llm_captions_first=-0.5", "llm_captions_first=-0.5"),
                                        ("--llm_heads=3", "llm_heads=3")])
def test_a_bad_llm_setting_fails_before_anything_is_built(tmp_path, bad, named):
    out = run_script("world.py", "--quickstart", f"--out={tmp_path}/w", bad, ok=False)
    assert out.returncode != 0 and named in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()
