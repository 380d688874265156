"""
The quick start: the whole method end to end on a laptop CPU, offline. Each step is one of the repository's
scripts, run as you would run it by hand with a config file:

    world.py --quickstart     scenes, captions, questions, a text corpus; a ViT and a small BLOOM pretrained on them
    train_pformer.py          P-Former stage 0 on the text corpus
    train_stage1.py           BLIP-2 stage 1, twice: plain, and aligned to the P-Former
    train_stage2.py           BLIP-2 stage 2, twice, likewise
    eval.py                   zero-shot VQA and captioning on the held-out scenes, for both runs

(the two models train side by side, each on half the cores; their lines of output begin with their names), then a
table of the results next to blind baselines (out/quickstart/results.md), a picture of held-out scenes with
what each model said (samples.png) and the loss curves of every stage (losses.png).

    python quickstart.py                  # the full size (make quickstart)
    python quickstart.py --size=small     # the tests' size (tests/test_quickstart.py)
    options: --size=full|small --data=DIR (the world) --out=DIR

Everything already done is reused (runs.py): the world, and every stage whose checkpoint reached its last step; a
stage that was interrupted continues from its checkpoint (init_from=resume). Run it from the repository root.
"""
import json
import os
import sys
import time

import runs
import world
from configurator import apply_overrides

SIZES = {  # world.py settings, the steps of each stage, and the caption scorers
    "full": dict(world={}, pformer=2000, stage1=300, stage2=1800, log_interval=20,
                 scorers="['BLEU','METEOR','ROUGE-L','CIDEr']"),
    # fewer scenes and steps; the backbone settings are the full size's, so that the shipped LLM and ViT serve and
    # nothing is pretrained
    "small": dict(world=dict(n_train=200, n_test=24), pformer=80, stage1=40, stage2=100, log_interval=5,
                  scorers="['BLEU','CIDEr']"),
}


def train(name, script, out_dir, steps, data, timings, *extra, threads=None, label=""):
    """One stage of the quick start: `script` with its config/quickstart_*.py, pointed at the world in `data`,
    `extra` last (runs.train: reused when done, resumed when interrupted)."""
    config = f"config/quickstart_{script.removeprefix('train_').removesuffix('.py')}.py"
    return runs.train(name, script, config, out_dir, steps, data, timings, *world.quickstart_args(script, data),
                      *extra, threads=threads, label=label)


def blip2(name, d, S, data, timings, threads, *extra):
    """One model: stages 1 and 2 in d/stage1 and d/stage2 (`extra`: the P-Former's checkpoint, or nothing), then
    zero-shot VQA and captioning on the held-out scenes in d/eval; its results."""
    log, lane = f"--log_interval={S['log_interval']}", dict(threads=threads, label=name)
    train(f"{name}: stage 1", "train_stage1.py", f"{d}/stage1", S["stage1"], data, timings, log, *extra, **lane)
    train(f"{name}: stage 2", "train_stage2.py", f"{d}/stage2", S["stage2"], data, timings, log,
          f"--stage1_ckpt={d}/stage1/ckpt.pt", *extra, **lane)
    ckpt = f"{d}/stage2/ckpt.pt"
    result = dict(dir=d, vqa=runs.evaluate(f"{name}: eval VQA", ckpt, "vqa", "test_vqa.json", f"{d}/eval", data,
                                           timings, S["scorers"], **lane),
                  caption=runs.evaluate(f"{name}: eval captions", ckpt, "caption", "test_captions.json", f"{d}/eval",
                                        data, timings, S["scorers"], **lane))
    result["caption_attributes"] = world.caption_attributes(f"{d}/eval/caption_captions.json", data)
    return result


def results_table(results, blind, oracle, timings, total):
    rows = [("blind: most frequent answer / most common caption", blind["top answer"]["overall"],
             blind["top caption CIDEr"]),
            ("blind: most frequent answer to each question in the text corpus",
             blind["answer per question"]["overall"], None)]
    rows += [(name, r["vqa"]["overall"], r["caption"].get("CIDEr")) for name, r in results.items()]
    rows += [("the frozen LLM reading the true caption as text, in place of the soft prompt", oracle["overall"], None)]
    lines = ["| model | zero-shot VQA accuracy (%) | caption CIDEr |", "|---|---|---|"]
    lines += [f"| {n} | {v:.1f} | {'' if c is None else f'{c:.3f}'} |" for n, v, c in rows]
    types = sorted(k for k in oracle if k not in ("overall", "scored", "missing", "empty", "color_by_objects"))
    lines += ["", "| VQA accuracy by question type (%) | " + " | ".join(types) + " |", "|---" * (len(types) + 1) + "|"]
    lines += ["| blind: most frequent answer to each question | " + " | ".join(
        f"{blind['answer per question'][t]:.1f}" for t in types) + " |"]
    lines += [f"| {n} | " + " | ".join(f"{r['vqa'][t]:.1f}" for t in types) + " |" for n, r in results.items()]
    lines += ["| the LLM reading the true caption | " + " | ".join(f"{oracle[t]:.1f}" for t in types) + " |"]
    lines += ["", "The LLM reading the true caption, colour questions by objects in the scene (chance with the scene's "
                  "colours known, their shapes not: 100 / 50 / 33): " +
              " / ".join(f"{n} object{'s' * (n != '1')} {v:.1f}" for n, v in oracle["color_by_objects"].items())]
    attrs = ["color", "shape", "size", "count"]
    lines += ["", "| objects named right in the captions (%) | colour | shape | size | number of objects |",
              "|---|---|---|---|---|"]
    lines += [f"| {n} | " + " | ".join(f"{r['caption_attributes'][a]:.1f}" for a in attrs) + " |"
              for n, r in results.items()]
    lines += ["", "| step | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    lines += [f"| total | {total:.0f} |"]
    lines += ["", f"Caption metrics tokenised with: {next(iter(results.values()))['caption'].get('tokenizer')}"]
    lines += ["", "One training seed per model: studies/pformer_effect.py measures how far the gap between the two "
                  "models moves with the seed and with a rebuilt world."]
    return "\n".join(lines)


def draw_pictures(results, questions, items, data, out, n_show=6):
    """samples.png (held-out scenes, each model's caption and answers) and losses.png (every stage's curves)."""
    import plots

    said = {}
    for name, r in results.items():
        with open(f"{r['dir']}/eval/vqa_answers.json") as f:
            answers = {a["question_id"]: a["answer"] for a in json.load(f)}
        with open(f"{r['dir']}/eval/caption_captions.json") as f:
            said[name] = answers, {c["image_id"]: c["caption"] for c in json.load(f)}
    samples = []
    for it in items[:n_show]:
        lines = [("truth", it["captions"][0], "black")]
        lines += [(name, captions.get(it["image_id"], ""), "navy") for name, (_, captions) in said.items()]
        for q in [q for q in questions if q["image"] == it["image"]][:3]:
            got = " / ".join(said[name][0].get(q["question_id"], "") for name in said)
            lines.append((q["question"], f"{got} (truth: {q['answers'][0]})", "darkgreen"))
        samples.append((os.path.join(data, "images", it["image"]), lines))
    plots.sample_grid(samples, f"{out}/samples.png")
    logs = [("P-Former stage 0", f"{out}/pformer/log.jsonl")]
    for name, r in results.items():
        logs += [(f"{name}: stage 1", f"{r['dir']}/stage1/log.jsonl"),
                 (f"{name}: stage 2", f"{r['dir']}/stage2/log.jsonl")]
    plots.loss_curves(logs, f"{out}/losses.png")


def main(size="full", data="data/quickstart", out="out/quickstart"):
    """The quick start at `size` (SIZES): the world in `data`, every run and the results under `out`."""
    S, timings, t_start = SIZES[size], {}, time.time()
    runs.run("world + backbones", ["world.py", "--quickstart", f"--out={data}",
                                   *[f"--{k}={v}" for k, v in S["world"].items()]], timings)
    train("P-Former stage 0", "train_pformer.py", f"{out}/pformer", S["pformer"], data, timings,
          f"--log_interval={S['log_interval']}")
    # the two models are independent: they train side by side, each on its share of the cores (small models keep two
    # threads busy less than two processes of one thread each)
    threads, lane_timings, t_lanes = runs.lane_threads(2), ({}, {}), time.time()
    plain, aligned = runs.side_by_side(
        lambda: blip2("BLIP-2", f"{out}/blip2", S, data, lane_timings[0], threads),
        lambda: blip2("BLIP-2 + P-Former", f"{out}/blip2_pformer", S, data, lane_timings[1], threads,
                      f"--pformer_ckpt={out}/pformer/ckpt.pt"))
    results = {"BLIP-2": plain, "BLIP-2 + P-Former": aligned}
    for lane in lane_timings:
        timings.update(lane)
    timings[f"both models, side by side ({threads} thread{'s' * (threads > 1)} each)"] = time.time() - t_lanes

    import metrics as M

    questions = M.load_vqa_list(f"{data}/test_vqa.json")
    items = M.load_caption_task("caption", f"{data}/test_captions.json")
    blind, oracle = world.blind_baselines(data, questions, items), world.true_caption_vqa(data, questions)
    total = time.time() - t_start
    table = results_table(results, blind, oracle, timings, total)
    print("\n" + table)
    runs.write_results(f"{out}/results", table, {"results": results, "blind": blind, "true_caption_vqa": oracle,
                                                 "seconds": timings, "total_seconds": total})
    draw_pictures(results, questions, items, data, out)
    print(f"\nwrote {out}/results.md, {out}/samples.png, {out}/losses.png ({total:.0f}s in all)")


if __name__ == "__main__":
    options = dict(size="full", data="data/quickstart", out="out/quickstart")
    try:
        apply_overrides(options, sys.argv[1:])
        if options["size"] not in SIZES:
            raise ValueError(f"--size={options['size']}: expected one of {', '.join(SIZES)}")
    except ValueError as e:
        raise SystemExit(f"quickstart.py: {e} (options: --size=full|small, --data=DIR, --out=DIR)")
    main(**options)
