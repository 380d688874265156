"""
Does P-Former help with both bridges? The P-Former paper calls its method modality-agnostic and shows it on video
"using varied base modules": its video code puts a BERT encoder, not a Q-Former, between clip features and the LLM.
This study asks the question in the video world (world.py --video: clips of a shape moving left or right, which a
single frame cannot tell), on clip features as the VATEX runs read them:

    1. the world, and its clips' features: every frame through the world's frozen ViT (as the training scripts
       build it from config/video_world_stage1.py), each frame's tokens mean-pooled: name.npy, S x F, under
       DATA/features beside the annotations' name.mp4;
    2. P-Former stage 0 on the world's text, once (config/video_world_pformer.py);
    3. for each bridge, arm and seed, stage 1 then stage 2 (studies/config/video_bridges_stage*.py), the same steps:
         bridge=qformer  BLIP-2:      ITC + ITM + ITG, then LM                  (the image recipe)
                         + P-Former:  ITC + ITM + ITG + 10 x align, then LM + 100 x align
         bridge=bert     BLIP-2:      no stage 1: LM from the world's BERT      (the VATEX recipe)
                         + P-Former:  100 x align alone, then LM alone
    4. zero-shot video QA and captions on the test clips (eval.py on the features), beside the blind baseline;
       {out}/results.md and .json: mean and spread over seeds, and P-Former minus BLIP-2 paired by seed.

    python -m studies.video_bridges                    # the full study: out/video_bridges/results.md
    python -m studies.video_bridges --size=small       # the test's size (tests/test_video_bridges.py)
    options: --seeds=[0,1,2] --size=full|small --data=data/video --out=out/video_bridges
             --world={'n_train':1500}   (world.py --video settings)   --steps={'stage2':400}   (pformer, stage1, stage2)

Everything done is reused when what produced it is unchanged (the quick start's train and evaluate helpers compare
each stage's settings and the identities of the world and the checkpoints it starts from).
"""
import json
import os
import runpy
import statistics
import sys
import time

import numpy as np
import torch

import metrics as M
import runs
from world import blind_baselines
from backbones import FrozenViT
from configurator import apply_overrides, override_args
from video import ClipTransform, decode_frames
from model import Blip2Config
from studies import video_world
from studies.video_world import VIDEO_WORLD, build_video_world

SIZES = {  # world.py --video settings, the steps of each stage, the log interval
    # P-Former stage 0 of 2000 steps: after 300 (the video world's) its prompts were far from reproducing their
    # captions, and the alignment pulled the Q-Former toward them
    "full": dict(world={}, pformer=2000, stage1=150, stage2=600, log_interval=50),
    "small": dict(world=dict(n_train=96, n_test=8, n_text=200, llm_steps=40, vit_steps=20), pformer=10, stage1=6,
                  stage2=10, log_interval=2),
}
STAGE1, STAGE2 = "studies/config/video_bridges_stage1.py", "studies/config/video_bridges_stage2.py"
PFORMER = "--pformer_ckpt={out}/pformer/ckpt.pt"
ARMS = [  # (bridge, arm, stage-1 arguments or None: no stage 1, stage-2 arguments)
    ("qformer", "BLIP-2", [], []),  # the image recipe: ITC + ITM + ITG, then LM
    ("qformer", "BLIP-2 + P-Former", [PFORMER], [PFORMER]),  # + 10 x align in stage 1, + 100 x align in stage 2
    ("bert", "BLIP-2", None, []),  # the VATEX recipe's baseline: LM alone, the bridge started from BERT
    ("bert", "BLIP-2 + P-Former", [PFORMER, "--stage1_losses=()", "--align_weight=100.0"], []),  # align, then LM
]
QA_TYPES = ["direction", "color", "shape", "count", "overall"]


def extract_features(data, n_frames, batch=64):
    """DATA/features/name.npy (n_frames x F, float32) for every training and test clip: its frames through the world's
    frozen ViT, built as the training scripts build it, tokens mean-pooled per frame. Skipped when done for this world
    (features/extracted.json holds the world's identity). Returns F."""
    cfg = runpy.run_path("studies/config/video_world_stage1.py")  # the world's ViT: vit_pretrained, vit_kwargs, vit_layers
    cfg["vit_pretrained"] = cfg["vit_pretrained"].replace("data/video", data, 1)
    vit = FrozenViT(Blip2Config.pick(cfg))
    out, record = f"{data}/features", f"{data}/features/extracted.json"
    wanted = dict(world=runs.identity(data), frames=n_frames, width=vit.width, vit=cfg["vit_pretrained"])
    if runs.read_json(record) == wanted:
        return vit.width
    names = set()
    for ann in ("train.json", "test_captions.json"):
        with open(f"{data}/{ann}") as f:
            names |= {a["video"] for a in json.load(f)}
    transform = ClipTransform(vit.image_size, train=False)  # the evaluation resize and CLIP normalisation
    names = sorted(names)
    for i in range(0, len(names), batch):
        chunk = names[i:i + batch]
        clips = torch.stack([transform(decode_frames(f"{data}/videos/{n}", n_frames, "uniform")) for n in chunk])
        features = vit(clips).mean(2)  # B x T x N x F -> B x T x F
        for name, f in zip(chunk, features):
            path = os.path.join(out, os.path.splitext(name)[0] + ".npy")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            np.save(path, f.numpy().astype(np.float32))
    M.write_json(record, wanted, indent=1)
    print(f"features: {len(names)} clips, {n_frames} x {vit.width} each, under {out}")
    return vit.width


def feature_args(data):
    """--key=value arguments that point studies/config/video_bridges_*.py at the world in `data` and its features."""
    return override_args(dict(train_ann=[f"{data}/train.json"], train_image_roots=[f"{data}/features"],
                              bert=f"{data}/bert"))


def train_arm(bridge, arm, stage1_args, stage2_args, seed, width, S, data, out, timings):
    """Stage 1 (unless the arm has none) and stage 2 of one bridge, arm and seed; returns the run's directory."""
    d = f"{out}/{bridge}/{'blip2_pformer' if 'P-Former' in arm else 'blip2'}/seed{seed}"
    common = [f"--log_interval={S['log_interval']}", f"--seed={seed}", f"--bridge={bridge}", f"--feature_dim={width}"]
    fill = lambda args: [a.format(out=out) for a in args]  # noqa: E731
    name = f"{bridge}, {arm}, seed {seed}"
    start = "--stage1_ckpt="  # the BERT bridge's VATEX baseline starts stage 2 from BERT itself
    if stage1_args is not None:
        start = "--stage1_ckpt=" + runs.train(f"{name}: stage 1", "train_stage1.py", STAGE1, f"{d}/stage1",
                                              S["stage1"], data, timings, *feature_args(data), *common,
                                              *fill(stage1_args))
    runs.train(f"{name}: stage 2", "train_stage2.py", STAGE2, f"{d}/stage2", S["stage2"], data, timings,
               *feature_args(data), f"--llm_model={data}/llm", *common, start, *fill(stage2_args))
    return d


def evaluate_arm(name, d, data, timings):
    """Zero-shot video QA and captions (CIDEr) of the run in d, on the test clips' features."""
    ckpt = f"{d}/stage2/ckpt.pt"
    qa = runs.evaluate(f"{name}: eval QA", ckpt, "video_qa", "test_qa.json", f"{d}/eval", data, timings,
                             "['CIDEr']", media="features")
    caption = runs.evaluate(f"{name}: eval captions", ckpt, "video_caption", "test_captions.json",
                                  f"{d}/eval", data, timings, "['CIDEr']", media="features")
    return {**{t: qa[t] for t in QA_TYPES}, "CIDEr": caption["CIDEr"]}


def mean_spread(values):
    """(mean, sample standard deviation; 0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(scores, seeds):
    """Per bridge and arm: mean and spread over seeds of each metric; per bridge: P-Former minus BLIP-2, same seed."""
    metrics = QA_TYPES + ["CIDEr"]
    arms = {f"{b} | {a}": {m: mean_spread([scores[b][a][s][m] for s in seeds]) for m in metrics}
            for b in scores for a in scores[b]}
    paired = {b: {m: mean_spread([scores[b]["BLIP-2 + P-Former"][s][m] - scores[b]["BLIP-2"][s][m] for s in seeds])
                  for m in metrics} for b in scores}
    return arms, paired


def results_table(arms, paired, blind, seeds, timings, total):
    def cell(mean_sd, digits=1):  # one seed has no spread to show
        return f"{mean_sd[0]:.{digits}f}" + (f" ± {mean_sd[1]:.{digits}f}" if len(seeds) > 1 else "")

    head = "| " + " | ".join(f"QA: {t}" for t in QA_TYPES[:-1]) + " | QA overall (%) | caption CIDEr |"
    rule = "|---" * (len(QA_TYPES) + 2) + "|"
    per_question = blind["answer per question"]
    lines = [f"Zero-shot on the test clips, mean ± standard deviation over seeds {seeds}.", "",
             "| bridge | model " + head, "|---" + rule,
             "| none | blind: most frequent answer to each question in the text / most common caption | "
             + " | ".join(f"{per_question[t]:.1f}" for t in QA_TYPES) + f" | {blind['top caption CIDEr']:.3f} |"]
    lines += [f"| {name} | " + " | ".join(cell(m[t]) for t in QA_TYPES) + f" | {cell(m['CIDEr'], 3)} |"
              for name, m in arms.items()]
    lines += ["", "P-Former minus BLIP-2, paired by seed (mean ± standard deviation of the differences):", "",
              "| bridge " + head, rule]
    lines += [f"| {b} | " + " | ".join(cell(d[t]) for t in QA_TYPES) + f" | {cell(d['CIDEr'], 3)} |"
              for b, d in paired.items()]
    by_arm = {}
    for step, seconds in timings.items():  # "qformer, BLIP-2, seed 0: stage 1" -> "qformer, BLIP-2"
        key = step.split(", seed")[0].split(":")[0]
        by_arm[key] = by_arm.get(key, 0.0) + seconds
    lines += ["", "| step (all seeds) | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in by_arm.items()]
    lines += [f"| total | {total:.0f} |"]
    return "\n".join(lines)


def main(size="full", seeds=(0, 1, 2), data="data/video", out="out/video_bridges", world=None, steps=None):
    """The study at `size`, its world settings updated by `world` and its steps by `steps` (pformer, stage1,
    stage2); returns the scores of every run, their means and spreads, the paired differences, the blind baseline."""
    if size not in SIZES:
        raise SystemExit(f"--size={size}: full or small")
    if not seeds:
        raise SystemExit("--seeds=[]: give one seed or more, e.g. --seeds=[0]")
    for option, given, known in (("world", world, VIDEO_WORLD), ("steps", steps, ("pformer", "stage1", "stage2"))):
        unknown = sorted(set(given or {}) - set(known))
        if unknown:
            raise SystemExit(f"--{option}={given}: unknown key {unknown[0]!r} (known: {', '.join(known)})")
    S = {**SIZES[size], **(steps or {}), "world": {**SIZES[size]["world"], **(world or {})}}
    timings, t_start = {}, time.time()
    width = extract_features(data, build_video_world(data, **S["world"])["n_frames"])
    timings["world + features"] = time.time() - t_start
    video_world.train("P-Former stage 0", "train_pformer.py", f"{out}/pformer", S["pformer"], data, timings,
                      f"--log_interval={S['log_interval']}")
    scores, dirs = {}, {}
    for seed in seeds:  # seed by seed: a study stopped early has whole seeds done, reused when it runs again
        for bridge, arm, stage1_args, stage2_args in ARMS:
            d = train_arm(bridge, arm, stage1_args, stage2_args, seed, width, S, data, out, timings)
            scores.setdefault(bridge, {}).setdefault(arm, {})[seed] = evaluate_arm(f"{bridge}, {arm}, seed {seed}", d,
                                                                                 data, timings)
            dirs[f"{bridge} | {arm} | seed {seed}"] = d
    blind = blind_baselines(data, M.load_video_qa(f"{data}/test_qa.json"),
                                       M.load_video_captions(f"{data}/test_captions.json"))
    arms, paired = summarise(scores, list(seeds))
    total = time.time() - t_start
    table = results_table(arms, paired, blind, list(seeds), timings, total)
    print("\n" + table)
    os.makedirs(out, exist_ok=True)
    runs.write_results(f"{out}/results", table, {"runs": scores, "dirs": dirs, "mean_sd": arms,
                                                 "pformer_minus_blip2": paired, "blind": blind, "seconds": timings,
                                                 "total_seconds": total})
    print(f"\nwrote {out}/results.md and .json ({total:.0f}s in all)")
    return scores, arms, paired, blind


if __name__ == "__main__":
    try:
        options = apply_overrides(dict(size="full", seeds=[0, 1, 2], data="data/video", out="out/video_bridges",
                                       world={}, steps={}), sys.argv[1:])
    except ValueError as e:
        raise SystemExit(f"studies/video_bridges.py: {e}")
    main(**options)
