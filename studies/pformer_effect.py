"""
P-Former's central claim, measured in the quick start's world: aligning the Q-Former to a P-Former trained on text
alone helps most when image-text pairs are scarce. Plain BLIP-2 and BLIP-2 + P-Former are trained on the first N
paired scenes for several N, with the same P-Former, the same steps and the same seeds (the scripts' --seed), and
evaluated zero-shot (VQA accuracy per question type, caption CIDEr, and the objects each caption names right) on
the world's held-out test scenes. The whole grid runs on several worlds (world.py --seed: other scenes, and
backbones pretrained again), so that a verdict can be checked against a rebuild of what was pretrained.

    python -m studies.pformer_effect            # the grid: {out}/test_150-300.md, .json and .png
    python -m studies.pformer_effect --split=val --n_pairs=[100] --seeds=[0] --stage2=150   # a choice, on validation
    python -m studies.pformer_effect --diagnose # what the prompts carry: {out}/w0/diagnosis.md, .json
    python -m studies.pformer_effect --size=small   # the tests' size (tests/test_pformer_effect.py)
    options: --worlds=[0,1] --n_pairs=[100,1900] --seeds=[0,1,2] --stage1=150 --stage2=300 --pformer=2000
             --out=DIR --data=DIR --size=full|small --split=test|val

Each difference between the arms is paired (same world, N and seed: the same data order and initial weights) and
comes with three kinds of noise: the evaluation's (a bootstrap over the test scenes), the seeds' (the spread of the
paired differences within a world) and the worlds' (each world's mean). Choices are made on validation scenes,
never on the test scenes: the last n_val scenes of train.json are in no subset; their captions are every stage's
validation loss, and they get questions as the test scenes do (--split=val evaluates on them).

Run from the repository root. Every stage is one of the train scripts with its config/quickstart_*.py, run as a
subprocess (runs.py), the two arms of a (world, N, seed) side by side on half the cores each; everything done is
reused when what produced it is unchanged (the settings and the identities of the world and the parent checkpoints);
an interrupted stage resumes. The world of the quick start's seed (1) takes its shipped backbones; any other world
pretrains its own (world.py --quickstart --seed=w), the longest step by far.
"""
import json
import os
import random
import sys
import time

import torch
from PIL import Image

import metrics as M
import plots
import runs
import world
from backbones import FrozenLLM
from checkpoints import from_checkpoint, pformer_from_checkpoint, read_checkpoint
from configurator import apply_overrides
from data import eval_transform
from metrics import VQA_PROMPT
from model import nearest_embeddings

SIZES = {  # the world, validation scenes, grid, steps per stage, arguments of every stage, caption scorers
    "full": dict(world={}, worlds=[0, 1], n_val=100, n_pairs=[100, 1900], seeds=[0, 1, 2], pformer=2000,
                 stage1=150, stage2=300, args=["--log_interval=20", "--eval_interval=50"], scorers="['BLEU','CIDEr']",
                 diag=dict(steps=[300, 1000], text_scenes=[200, 2000])),
    "small": dict(world=dict(n_train=40, n_test=8, n_text=300, vit_steps=8, llm_width=64, llm_layers=2,
                             llm_steps=40, llm_batch=32, llm_lr=0.002, llm_questions=2),
                  worlds=[0, 1], n_val=8, n_pairs=[16], seeds=[0], pformer=10, stage1=8, stage2=10,
                  args=["--log_interval=2", "--eval_interval=5", "--batch_size=8"],
                  scorers="['CIDEr']", diag=dict(steps=[5], text_scenes=[50])),
}
ARMS = {"BLIP-2": "blip2", "BLIP-2 + P-Former": "blip2_pformer"}


def write_json(path, obj):
    M.write_json(path, obj, indent=1)


def write_splits(data, n_pairs, n_val, seed=0):
    """train_n{N}.json: the first N scenes of train.json (nested subsets); val_captions.json and val_vqa.json: the
    last n_val scenes, in no subset, with one question of each type they allow (as world.write_scenes asks of the
    test scenes)."""
    with open(f"{data}/train.json") as f:
        train = json.load(f)
    if max(n_pairs) > len(train) - n_val:
        raise ValueError(f"N={max(n_pairs)}: train.json holds {len(train)} scenes, {n_val} kept for validation")
    for n in n_pairs:
        write_json(f"{data}/train_n{n}.json", train[:n])
    val, vqa, rng = train[len(train) - n_val:], [], random.Random(seed)
    for it in val:
        by_type = {}
        for q, a, kind in world.scene_questions(it["scene"]):
            by_type.setdefault(kind, []).append((q, a))
        for kind, qas in by_type.items():
            q, a = rng.choice(qas)
            vqa.append(dict(question_id=len(vqa), image=it["image"], question=q, answer=a, answer_type=kind))
    write_json(f"{data}/val_captions.json", val)
    write_json(f"{data}/val_vqa.json", vqa)


def stage(name, script, out_dir, steps, data, timings, *extra, **lane):
    """One stage: `script` with its config/quickstart_*.py, pointed at the world in `data`, `extra` last; lane:
    runs.train's threads and label."""
    config = f"config/quickstart_{script.removeprefix('train_').removesuffix('.py')}.py"
    return runs.train(name, script, config, out_dir, steps, data, timings, *world.quickstart_args(script, data),
                      *extra, **lane)


def pformer(out_dir, steps, data, S, timings, *extra):
    """P-Former stage 0 on the corpus's captions (config/quickstart_pformer.py), validated on the validation
    scenes' captions; the checkpoint."""
    return stage(f"P-Former {out_dir}", "train_pformer.py", out_dir, steps, data, timings, *S["args"],
                 f"--val_text=['{data}/val_captions.json']", *extra)


def blip2(d, n, seed, pformer_ckpt, data, S, timings, **lane):
    """Stages 1 and 2 on the first n scenes (aligned to the P-Former when pformer_ckpt), in d/stage1_{steps} and
    d/stage2_{steps}-{steps} (a stage 1 serves every stage-2 length); the stage-2 checkpoint."""
    common = [*S["args"], f"--seed={seed}", f"--train_ann=['{data}/train_n{n}.json']",
              f"--val_ann=['{data}/val_captions.json']"] + ([f"--pformer_ckpt={pformer_ckpt}"] if pformer_ckpt else [])
    s1 = stage(f"{d}: stage 1", "train_stage1.py", f"{d}/stage1_{S['stage1']}", S["stage1"], data, timings, *common,
               **lane)
    return stage(f"{d}: stage 2", "train_stage2.py", f"{d}/{steps(S)}", S["stage2"], data, timings, *common,
                 f"--stage1_ckpt={s1}", **lane)


def steps(S):
    return f"stage2_{S['stage1']}-{S['stage2']}"


def run_dir(out, arm, n, seed):
    return f"{out}/runs/{ARMS[arm]}_n{n}_seed{seed}"


def scene_scores(eval_dir, data, split):
    """Per held-out scene, what one run got right: VQA questions answered right by type ("vqa/color": [right,
    asked]), and the objects whose colour, shape and size its caption names right ("caption/color": [right,
    objects]): what the bootstrap over scenes resamples."""
    with open(f"{data}/{split}_captions.json") as f:
        scenes = {it["image"]: it["scene"] for it in json.load(f)}
    with open(f"{eval_dir}/vqa_answers.json") as f:
        answers = {a["question_id"]: a["answer"] for a in json.load(f)}
    with open(f"{eval_dir}/caption_captions.json") as f:
        captions = {c["image_id"]: c["caption"] for c in json.load(f)}
    out = {image: {} for image in scenes}
    for q in M.load_vqa_list(f"{data}/{split}_vqa.json"):
        right = M.normalize_vqa_answer(answers.get(q["question_id"], "")) == M.normalize_vqa_answer(q["answers"][0])
        for key in ("vqa/overall", f"vqa/{q['answer_type']}"):
            tally = out[q["image"]].setdefault(key, [0, 0])
            tally[0], tally[1] = tally[0] + right, tally[1] + 1
    for image, scene in scenes.items():
        hits = world.caption_attribute_hits(captions.get(image, ""), scene)
        for k in ("color", "shape", "size"):
            out[image][f"caption/{k}"] = [hits[k], hits["objects"]]
    return out


def percent(scores, keys, images):
    right = sum(scores[i].get(k, [0, 0])[0] for i in images for k in keys)
    asked = sum(scores[i].get(k, [0, 0])[1] for i in images for k in keys)
    return 100.0 * right / asked if asked else float("nan")


def paired_difference(plain, aligned, key, rounds=1000, seed=0):
    """P-Former minus BLIP-2 on one metric for one pair of runs (same world, N and seed), with its 95% interval
    from a bootstrap over the held-out scenes (both runs resampled together: the evaluation's own noise)."""
    images = sorted(plain)
    diff = percent(aligned, [key], images) - percent(plain, [key], images)
    rng, draws = random.Random(seed), []
    for _ in range(rounds):
        sample = rng.choices(images, k=len(images))
        draws.append(percent(aligned, [key], sample) - percent(plain, [key], sample))
    draws.sort()
    return diff, draws[int(0.025 * rounds)], draws[int(0.975 * rounds) - 1]


def grid(data, out, S, split, timings):
    """Every (seed, N, arm) of one world trained and evaluated on `split` (test or val): {arm: {N: {metric: [per
    seed]}}} and {f"{arm} N={n} seed={seed}": scene_scores}."""
    pf = pformer(f"{out}/pformer", S["pformer"], data, S, timings)
    results, scores = {arm: {} for arm in ARMS}, {}
    lane = dict(threads=runs.lane_threads(len(ARMS)))

    def arm_run(arm, n, seed):  # one arm: trained, evaluated (VQA, captions), its per-scene scores
        d = run_dir(out, arm, n, seed)
        ckpt = blip2(d, n, seed, pf if "P-Former" in arm else "", data, S, timings, **lane, label=arm)
        eval_dir = f"{d}/eval_{split}_{steps(S)}"
        vqa, cap = (runs.evaluate(f"{d}: {task} ({split})", ckpt, task, f"{split}_{ann}.json", eval_dir, data,
                                  timings, S["scorers"], **lane, label=arm)
                    for task, ann in [("vqa", "vqa"), ("caption", "captions")])
        return vqa, cap, scene_scores(eval_dir, data, split)

    for seed in S["seeds"]:  # seeds outermost: an interrupted grid has every N of its first seeds
        for n in S["n_pairs"]:  # the arms side by side (as in the quick start)
            done = runs.side_by_side(*[lambda arm=arm: arm_run(arm, n, seed) for arm in ARMS])
            for arm, (vqa, cap, per_scene) in zip(ARMS, done):
                r = results[arm].setdefault(n, {"vqa": [], "cider": []})
                r["vqa"].append(vqa["overall"])
                r["cider"].append(cap["CIDEr"])
                scores[f"{arm} N={n} seed={seed}"] = per_scene
    return results, scores


def stats(v):
    m = sum(v) / len(v)
    sd = (sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0.0
    return m, sd, min(v), max(v)


def table(results, digits=(1, 3)):
    """Markdown: per N and metric, each arm's mean ± sd [min, max] (per-seed values), and the P-Former arm minus the
    plain arm, seed by seed (the same seed: the same data order and initial weights)."""
    plain, pf = results["BLIP-2"], results["BLIP-2 + P-Former"]
    lines = ["| N pairs | metric | BLIP-2: mean ± sd [min, max] (seeds) | BLIP-2 + P-Former | P-Former minus BLIP-2, "
             "per seed: mean [min, max] |", "|---|---|---|---|---|"]
    for n in sorted(plain):
        for key, d in zip(["vqa", "cider"], digits):
            cells = []
            for v in (plain[n][key], pf[n][key]):
                m, sd, lo, hi = stats(v)
                cells.append(f"{m:.{d}f} ± {sd:.{d}f} [{lo:.{d}f}, {hi:.{d}f}] ({', '.join(f'{x:.{d}f}' for x in v)})")
            m, _, lo, hi = stats([b - a for a, b in zip(plain[n][key], pf[n][key])])
            lines.append(f"| {n} | {'VQA %' if key == 'vqa' else 'CIDEr'} | {cells[0]} | {cells[1]} | "
                         f"{m:+.{d}f} [{lo:+.{d}f}, {hi:+.{d}f}] |")
    return "\n".join(lines)


METRICS = ["vqa/overall", "vqa/color", "vqa/shape", "vqa/size", "vqa/count", "vqa/position", "caption/color",
           "caption/shape", "caption/size"]


def paired_table(scores_by_world, n_pairs, seeds):
    """Markdown and numbers: per N and metric (VQA accuracy per question type, objects named right in captions per
    attribute), each arm's mean over worlds and seeds, and P-Former minus BLIP-2: its mean, each world's mean with
    the spread of its seeds [min, max], and the bootstrap's 95% interval over test scenes (the median half-width over
    the pairs: the evaluation's noise on one pair)."""
    lines = ["| N | metric | BLIP-2 | + P-Former | difference: mean | per world: mean [seed min, max] | "
             "evaluation noise: ± (bootstrap 95%, one pair) | pairs above 0 |", "|---" * 8 + "|"]
    numbers = {}
    for n in n_pairs:
        for key in METRICS:
            plain, aligned, diffs, halfs, per_world = [], [], [], [], {}
            for w, scores in scores_by_world.items():
                for seed in seeds:
                    a, b = scores[f"BLIP-2 N={n} seed={seed}"], scores[f"BLIP-2 + P-Former N={n} seed={seed}"]
                    images = sorted(a)
                    plain.append(percent(a, [key], images))
                    aligned.append(percent(b, [key], images))
                    diff, lo, hi = paired_difference(a, b, key)
                    diffs.append(diff)
                    halfs.append((hi - lo) / 2)
                    per_world.setdefault(w, []).append(diff)
            mean = lambda v: sum(v) / len(v)  # noqa: E731
            worlds = "; ".join(f"world {w}: {mean(v):+.1f} [{min(v):+.1f}, {max(v):+.1f}]" for w, v in per_world.items())
            half = sorted(halfs)[len(halfs) // 2]
            lines.append(f"| {n} | {key} | {mean(plain):.1f} | {mean(aligned):.1f} | {mean(diffs):+.1f} | {worlds} | "
                         f"± {half:.1f} | {sum(d > 0 for d in diffs)} of {len(diffs)} |")
            numbers[f"N={n} {key}"] = dict(plain=plain, aligned=aligned, differences=diffs, per_world=per_world,
                                           bootstrap_half_width=halfs)
    return "\n".join(lines), numbers


def experiment(data, out, S, split, timings):
    """The grid on every world, its tables (markdown), its numbers (JSON) and its figure (PNG), named
    {split}_{stage1}-{stage2}: the first world's curves against N, and the paired differences over all worlds."""
    results, scores_by_world = {}, {}
    for w in S["worlds"]:
        results[w], scores_by_world[w] = grid(f"{data}/w{w}", f"{out}/w{w}", S, split, timings)
    data0, first = f"{data}/w{S['worlds'][0]}", results[S["worlds"][0]]
    reference = {}
    if split == "test":  # the blind baselines and the LLM reading the true caption, on the first world's questions
        questions = M.load_vqa_list(f"{data0}/test_vqa.json")
        items = M.load_caption_task("caption", f"{data0}/test_captions.json")
        blind = world.blind_baselines(data0, questions, items)
        oracle = world.true_caption_vqa(data0, questions)["overall"]
        reference = {"vqa": [("LLM reading the true caption", oracle),
                             ("blind: top answer per question", blind["answer per question"]["overall"])],
                     "cider": [("blind: most common caption", blind["top caption CIDEr"])]}
    name = f"{out}/{split}_{S['stage1']}-{S['stage2']}"
    plots.metric_vs_pairs(first, [("vqa", "zero-shot VQA accuracy (%)"), ("cider", "caption CIDEr")],
                          f"{name}.png", reference)
    paired, numbers = paired_table(scores_by_world, S["n_pairs"], S["seeds"])
    text = (f"Zero-shot VQA and CIDEr on the {split} scenes, stages of {S['stage1']} and {S['stage2']} steps, seeds "
            f"{S['seeds']}, worlds {S['worlds']} (world.py --seed: other scenes, other backbones), each world's own "
            f"P-Former ({S['pformer']} steps) for its aligned runs; the two arms side by side, "
            f"{runs.lane_threads(len(ARMS))} torch thread(s) each.\n\n" +
            "\n\n".join(f"World {w}:\n\n" + table(r) for w, r in results.items()) +
            "\n\nReferences (world " + str(S["worlds"][0]) + "): " +
            "; ".join(f"{lab} {v:.3f}" for refs in reference.values() for lab, v in refs) +
            "\n\nP-Former minus BLIP-2, paired (same world, N and seed), per question type and caption attribute:\n\n"
            + paired)
    runs.write_results(name, text, dict(results={str(w): r for w, r in results.items()}, paired=numbers,
                                        reference=reference, seconds=timings))
    print("\n" + text + f"\n\nwrote {name}.md, {name}.json, {name}.png")

# -----------------------------------------------------------------------------
# the diagnosis: what the frozen LLM reads in each kind of prompt


def readout(llm, prompts, mask, items, questions):
    """What the frozen LLM makes of one prompt per scene (B x Q x d_LLM, mask B x Q or None): zero-shot VQA accuracy
    with eval.py's generation (beam 5, <= 10 tokens); the greedy continuation after BOS, scored against the scene's
    captions (CIDEr) and by exact match of its content (the canonical caption, "a picture of" / "there is" removed);
    the LM loss of the canonical caption after the prompt (nll, per token: what stages 0 and 2 minimise);
    the mean L2 distance of the prompt vectors to their nearest LLM token embedding, and their mean norm."""
    row = {it["image"]: i for i, it in enumerate(items)}
    answers = {}
    with torch.no_grad():
        for i in range(0, len(questions), 50):
            chunk = questions[i:i + 50]
            rows = [row[q["image"]] for q in chunk]
            out = llm.generate_tokens(prompts[rows], [VQA_PROMPT.format(M.clean_question(q["question"]))
                                                      for q in chunk], prompt_mask=None if mask is None else mask[rows],
                                      num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=0.0)
            answers.update(zip([q["question_id"] for q in chunk], llm.decode(out)))
        text = llm.decode(llm.generate_tokens(prompts, "", prompt_mask=mask, num_beams=1, max_new_tokens=30))
        nll = sum(llm.lm_loss((p if mask is None else p[m.bool()])[None], [world.scene_caption(it["scene"])]).item()
                  for p, m, it in zip(prompts, prompts[..., 0] if mask is None else mask, items)) / len(items)
        table = llm.model.get_input_embeddings().weight.float()
        flat = prompts.float().flatten(0, 1)  # every prompt vector (of a text prompt: the real tokens only)
        flat = flat if mask is None else flat[mask.flatten().bool()]
        dist = (flat - table[nearest_embeddings(flat, table)]).norm(dim=1).mean().item()
    content = [t.removeprefix("a picture of ").removeprefix("there is ") for t in text]
    exact = sum(c == world.scene_caption(it["scene"]) for c, it in zip(content, items)) / len(items)
    cider = M.caption_metrics(dict(enumerate(text)), {i: it["caption"] for i, it in enumerate(items)}, ["CIDEr"])
    return dict(vqa=M.generic_vqa_scores(answers, questions)["overall"], exact=100 * exact, cider=cider["CIDEr"],
                nll=nll, dist=dist, norm=flat.norm(dim=1).mean().item(),
                example=f"{items[0]['caption'][0]} -> {text[0]}")


def text_prompts(llm, items):
    """(a) the true caption as text: a document "</s> caption\\n" before the question's own BOS, as in the pages
    the LLM read (world.true_caption_vqa)."""
    t = llm.tokenize([world.scene_caption(it["scene"]) + "\n" for it in items], padding_side="left")
    return llm.embed(t.input_ids), t.attention_mask


def pformer_prompts(ckpt, items):
    """(b) the P-Former's prompt for each scene's true (canonical) caption."""
    pf = pformer_from_checkpoint(read_checkpoint(ckpt, expect_stage=0), ckpt).eval()
    with torch.no_grad():
        return pf(*pf.tokenize([world.scene_caption(it["scene"]) for it in items], "cpu"))[0]


def last_loss(ckpt):
    """The last logged training losses of the run that wrote ckpt (its log.jsonl)."""
    with open(f"{os.path.dirname(ckpt)}/log.jsonl") as f:
        return [r for r in map(json.loads, f) if "loss" in r][-1]


def diagnosis_table(rows, emb):
    """diagnosis.md's lines: one row per prompt, the token embeddings' spacing, a greedy continuation each."""
    keys = ["exact", "cider", "nll", "dist", "norm", "mse"]
    lines = ["| prompt | VQA % | exact reconstruction % | CIDEr | caption LM loss | dist. to nearest token | norm | "
             "MSE to the grid's P-Former prompt | stage-0 loss (lm) |", "|---" * 9 + "|"]
    lines += [f"| {k} | {r['vqa']:.1f} | " + " | ".join(f"{r[x]:.3f}" if x in r else "" for x in keys) + " | " +
              (f"{r['stage0']['loss']:.3f} ({r['stage0']['lm']:.3f})" if "stage0" in r else "") + " |"
              for k, r in rows.items()]
    lines += ["", "Token embeddings: " + "; ".join(f"{k}: mean distance to the nearest other token {v['nearest']:.3f},"
                                                   f" mean pairwise {v['pairwise']:.3f}, mean norm {v['norm']:.3f}"
                                                   for k, v in emb.items())]
    lines += ["", "Greedy continuations (first test scene):"]
    lines += [f"- {k}: {r['example']}" for k, r in rows.items() if "example" in r]
    return lines


def diagnose(data, out, S, timings):
    """(a) the true caption as text, (b) the P-Former's prompt for it (the grid's P-Former and variants: stage-0
    steps, no masking, a smaller corpus), (c) the trained Q-Former's prompt (seed 0, the smallest and largest N,
    both arms): readout() of each on the test scenes. Nothing here chooses anything."""
    d, D, rows = f"{out}/diagnosis", S["diag"], {}
    os.makedirs(d, exist_ok=True)
    with open(f"{data}/test_captions.json") as f:
        items = json.load(f)
    questions = M.load_vqa_list(f"{data}/test_vqa.json")
    llm = FrozenLLM.from_pretrained(f"{data}/llm")
    rows["(a) true caption as text"] = readout(llm, *text_prompts(llm, items), items, questions)
    rows["(a) check: world.true_caption_vqa"] = dict(vqa=world.true_caption_vqa(data, questions)["overall"])
    pf = {f"{S['pformer']} steps (the grid's)": pformer(f"{out}/pformer", S["pformer"], data, S, timings)}
    for steps in D["steps"]:
        pf[f"{steps} steps"] = pformer(f"{d}/pformer_steps{steps}", steps, data, S, timings)
    pf[f"{S['pformer']} steps, mask_rate 0"] = pformer(f"{d}/pformer_mask0", S["pformer"], data, S, timings,
                                                       "--mask_rate=0.0")
    with open(f"{data}/corpus_captions.txt") as f:
        corpus = f.read().splitlines()
    for k in D["text_scenes"]:  # the corpus's first k scenes (3 captions each), the same steps
        with open(f"{d}/corpus_{k}.txt", "w") as f:
            f.writelines(line + "\n" for line in corpus[:3 * k])
        pf[f"{S['pformer']} steps, corpus of {k} scenes"] = pformer(f"{d}/pformer_text{k}", S["pformer"], data, S,
                                                                   timings, f"--train_text=['{d}/corpus_{k}.txt']")
    target = pformer_prompts(pf[f"{S['pformer']} steps (the grid's)"], items)  # what stages 1 and 2 aligned to
    for name, ckpt in pf.items():
        rows[f"(b) P-Former, {name}"] = dict(readout(llm, pformer_prompts(ckpt, items), None, items, questions),
                                             stage0=last_loss(ckpt))
    for n in (min(S["n_pairs"]), max(S["n_pairs"])):
        for arm in ARMS:
            model = from_checkpoint(blip2(run_dir(out, arm, n, S["seeds"][0]), n, S["seeds"][0],
                                          pf[f"{S['pformer']} steps (the grid's)"] if "P-Former" in arm else "",
                                          data, S, timings))
            tf = eval_transform(model.config.image_size)
            images = torch.stack([tf(Image.open(f"{data}/images/{it['image']}").convert("RGB")) for it in items])
            with torch.no_grad():
                soft = model.soft_prompt(images)
            rows[f"(c) Q-Former of {arm}, N={n}, seed {S['seeds'][0]}"] = dict(
                readout(model.llm, soft, None, items, questions), mse=(soft - target).square().mean().item())
    e = llm.model.get_input_embeddings().weight.float()
    dd = torch.cdist(e, e).fill_diagonal_(float("inf"))
    emb = {"the LLM": dict(nearest=dd.min(1).values.mean().item(), pairwise=dd[dd.isfinite()].mean().item(),
                           norm=e.norm(dim=1).mean().item())}
    lines = diagnosis_table(rows, emb)
    runs.write_results(f"{out}/diagnosis", "\n".join(lines), dict(rows=rows, embeddings=emb, seconds=timings))
    print("\n" + "\n".join(lines))


def main(size="full", data="data/experiment", out="out/experiment", split="test", diagnose_only=False, **choices):
    """Each world (built once; world seed w under {data}/w{w}), its validation split and subsets, then the grid or
    the diagnosis (on the first world)."""
    S, timings, t0 = {**SIZES[size], **choices}, {}, time.time()
    for w in S["worlds"] if not diagnose_only else S["worlds"][:1]:
        runs.run(f"world {w} + backbones", ["world.py", "--quickstart", f"--out={data}/w{w}", f"--seed={w}",
                                            *[f"--{k}={v}" for k, v in S["world"].items()]], timings)
        os.makedirs(f"{out}/w{w}", exist_ok=True)
        write_splits(f"{data}/w{w}", S["n_pairs"], S["n_val"])
    if diagnose_only:
        diagnose(f"{data}/w{S['worlds'][0]}", f"{out}/w{S['worlds'][0]}", S, timings)
    else:
        experiment(data, out, S, split, timings)
    print(f"\n{time.time() - t0:.0f}s in all")


CHOICES = ("worlds", "n_pairs", "seeds", "stage1", "stage2", "pformer")  # options that override SIZES[size]


def read_options(argv):
    """main()'s keyword arguments from the command line (see the docstring): --diagnose, then --key=value."""
    options = dict(size="full", data="data/experiment", out="out/experiment", split="test", **dict.fromkeys(CHOICES))
    apply_overrides(options, [a for a in argv if a != "--diagnose"])
    if options["size"] not in SIZES:
        raise ValueError(f"--size={options['size']}: expected one of {', '.join(SIZES)}")
    if options["split"] not in ("test", "val"):
        raise ValueError(f"--split={options['split']}: expected test or val")
    for key in CHOICES:  # their defaults depend on --size: checked here against the full size's
        example = SIZES["full"][key]
        if options[key] is not None and type(options[key]) is not type(example):
            raise ValueError(f"--{key}={options[key]!r}: expected {type(example).__name__}, e.g. --{key}={example}")
    return dict({k: v for k, v in options.items() if v is not None}, diagnose_only="--diagnose" in argv)


if __name__ == "__main__":
    try:
        options = read_options(sys.argv[1:])
    except ValueError as e:
        raise SystemExit(f"studies/pformer_effect.py: {e} (the options are in its docstring)")
    main(**options)
