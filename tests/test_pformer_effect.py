"""studies/pformer_effect.py end to end at its CI size (--size=small: worlds of 40 scenes, one value of N, one seed,
a few steps per stage): it writes the table, the numbers and the figure, every run's logged loss falls, a second run
reuses everything, and the diagnosis reads out every kind of prompt. The scripts run in this process
(conftest.quickstart_in_process)."""
import json

import pytest
import torch

from studies import pformer_effect


def losses(path):
    with open(path) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


@pytest.fixture
def one_thread():
    """One intra-op thread while the test runs: on 2 shared cores, 2-thread OpenMP regions that wait for a busy core
    spin, and this test took 6 minutes instead of 30 s next to another job."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_pformer_effect_small(tmp_path, quickstart_in_process, one_thread, capsys):
    S, data, out = pformer_effect.SIZES["small"], tmp_path / "data", tmp_path / "out"
    pformer_effect.main("small", data=str(data), out=str(out))
    name = out / f"test_{S['stage1']}-{S['stage2']}"
    table = name.with_suffix(".md").read_text()
    assert all(f"| {n} | VQA % |" in table and f"| {n} | CIDEr |" in table for n in S["n_pairs"]), table
    for key in pformer_effect.METRICS:  # the paired table: every question type and caption attribute, every world
        row = next(line for line in table.splitlines() if line.startswith(f"| {S['n_pairs'][0]} | {key} |"))
        assert all(f"world {w}:" in row for w in S["worlds"]) and "± " in row, row
    assert name.with_suffix(".png").stat().st_size > 0
    numbers = json.loads(name.with_suffix(".json").read_text())
    for w in S["worlds"]:
        results = numbers["results"][str(w)]
        assert {arm: sorted(map(int, r)) for arm, r in results.items()} == \
            {arm: S["n_pairs"] for arm in pformer_effect.ARMS}
        assert all(len(v) == len(S["seeds"]) for r in results.values() for m in r.values() for v in m.values())
    pairs = numbers["paired"][f"N={S['n_pairs'][0]} vqa/overall"]
    assert len(pairs["differences"]) == len(S["worlds"]) * len(S["seeds"])
    assert all(h >= 0 for h in pairs["bootstrap_half_width"])
    # the two worlds differ: other scenes and other backbones
    w0, w1 = (json.loads((data / f"w{w}" / "world.json").read_text()) for w in S["worlds"])
    assert w0["backbones"] != w1["backbones"]
    # the validation scenes are in no subset
    val = {a["image"] for a in json.loads((data / "w0" / "val_captions.json").read_text())}
    assert len(val) == S["n_val"]
    assert not val & {a["image"] for a in json.loads((data / "w0" / f"train_n{max(S['n_pairs'])}.json").read_text())}
    logs = sorted(out.rglob("log.jsonl"))
    # per world, the P-Former, then 2 stages per run
    assert len(logs) == len(S["worlds"]) * (1 + 2 * len(S["n_pairs"]) * len(S["seeds"]) * 2)
    for log in logs:
        loss = losses(log)
        assert len(loss) > 1 and loss[0] > loss[-1], (log, loss)
    # a second run reuses the worlds, every stage and every evaluation
    capsys.readouterr()
    quickstart_in_process.clear()
    pformer_effect.main("small", data=str(data), out=str(out))
    again = capsys.readouterr().out
    assert quickstart_in_process == [f"world {w} + backbones" for w in S["worlds"]]
    assert again.count("done already") == len(logs)
    # the diagnosis reuses the grid's P-Former and runs, adds its stage-0 variants, and reads out every kind of
    # prompt: text prompts sit on token embeddings, the others do not
    pformer_effect.main("small", data=str(data), out=str(out), diagnose_only=True)
    rows = json.loads((out / "w0" / "diagnosis.json").read_text())["rows"]
    assert rows["(a) true caption as text"]["dist"] < 1e-5 and rows["(a) true caption as text"]["vqa"] == \
        rows["(a) check: world.true_caption_vqa"]["vqa"]
    assert sum(k.startswith("(b) P-Former") for k in rows) == 4
    assert sum(k.startswith("(c)") for k in rows) == 2 * len({min(S["n_pairs"]), max(S["n_pairs"])})
    assert all(r["dist"] > 1e-3 for k, r in rows.items() if k.startswith(("(b)", "(c)")))
    diagnosis = (out / "w0" / "diagnosis.md").read_text()
    assert all(f"| {k} | " in diagnosis for k in rows), diagnosis
    # a P-Former trained longer is another P-Former: it and every aligned run are trained again, the plain runs not
    quickstart_in_process.clear()
    pformer_effect.main("small", data=str(data), out=str(out), worlds=[0], pformer=S["pformer"] + 2)
    steps = [s for s in quickstart_in_process if "world" not in s]
    assert len(steps) == 1 + 2 * len(S["n_pairs"]) * len(S["seeds"]) + 2 * len(S["n_pairs"]) * len(S["seeds"]), steps
    assert all("blip2_pformer" in s or s.startswith("P-Former") for s in steps), steps
