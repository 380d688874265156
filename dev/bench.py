"""
Training-step benchmark of the three stages, nanoGPT style: samples/s, the step split into data / forward /
backward / optimizer, the forward split by part, peak memory, FLOPs by part and MFU. Stage 2 also runs
transformers' own Blip2ForConditionalGeneration on identical weights and inputs and prints the time ratio.

    python -m dev.bench                                    # all stages, 'small' size, CPU (or the GPU if there is one)
    python -m dev.bench --stage=2 --size=tiny --steps=3
    python -m dev.bench --stage=0 --size=real --llm_layers=2 --device=cpu --batch_size=8   # VQ at OPT-2.7b's width
    python -m dev.bench --stage=2 --size=real --device=cuda --dtype=bfloat16 --batch_size=64 --compile=True
    python -m dev.bench --size=real --flops_only=True --device=cpu       # FLOPs per sample at real sizes, in seconds

Sizes (random weights, nothing is downloaded):
    real   EVA ViT-g/14 (39 of 40 blocks, 224 px) + BERT-base Q-Former + OPT-2.7b (vocab 50272); P-Former BERT-base
    small  the same proportions 8x narrower and 4x shallower (sequence lengths kept: 257 image tokens,
           32 queries, captions of up to 32 tokens); vocabularies scaled with width x depth, so that the LM
           heads keep their real share of the work.
    tiny   the test sizes: everything 64 wide, 2 layers, 28 px images, 8 queries
FLOPs come from torch.utils.flop_counter on one step, split by module: the frozen forwards (ViT, LLM),
the LLM's backward to the soft prompt (input gradients only), and the trainable parts' forward + backward.
Run from the repository root (python -m dev.bench: the repository's modules import as usual).
"""
import contextlib
import os
import resource
import statistics
import sys
import tempfile
import time

import torch

import train_common as tc
from configurator import apply_overrides
from metrics import provenance

# -----------------------------------------------------------------------------
# config
stage = None  # 0, 1, 2, or None / 'all' for all three
size = "small"  # 'tiny' | 'small' | 'real'
batch_size = 8
steps = 5  # timed steps (after warmup)
warmup = 2  # untimed steps first (allocator, autotuning, torch.compile)
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast and frozen weights (no GradScaler: timing)
compare_hf = True  # stage 2: also time transformers' Blip2ForConditionalGeneration on the same weights and batch
compile = False  # torch.compile our model's blocks (train_common.compile_blocks), as train_common.train does with compile=True
compile_hf = False  # torch.compile the HF reference's vision tower, Q-Former and LLM as well
cache = False  # stages 1 and 2: the step reads precomputed frozen-ViT features instead of images (no augmentation)
flops_only = False  # no timing: FLOPs per sample by part at the size's full depth (see flops_at_full_depth), and the
#                     samples/s per GPU that they allow at a given MFU (e.g. the real sizes, on a CPU, in seconds)
llm_layers = 0  # > 0: override the LLM depth of the size (e.g. OPT-2.7b's width and vocabulary, 2 layers, on CPU)
vit_layers = 0  # > 0: override the ViT depth of the size
threads = 0  # > 0: torch.set_num_threads
seed = 0
# -----------------------------------------------------------------------------

# (width, depth, heads, MLP) and vocabularies for each size; the ViT keeps EVA-g's head width 88, OPT its 80
SIZES = {
    "real": dict(vit=(1408, 39, 16, 6144), image=224, patch=14, qformer=(768, 12, 12, 3072), queries=32,
                 bert_vocab=30523, embed_dim=256, llm=(2560, 32, 32, 10240), llm_vocab=50272),
    "small": dict(vit=(176, 10, 2, 768), image=224, patch=14, qformer=(96, 3, 2, 384), queries=32,
                  bert_vocab=954, embed_dim=32, llm=(320, 8, 4, 1280), llm_vocab=1571),
    "tiny": dict(vit=(64, 2, 4, 128), image=28, patch=14, qformer=(64, 2, 4, 128), queries=8,
                 bert_vocab=256, embed_dim=32, llm=(64, 2, 4, 128), llm_vocab=512),
}
# COCO-like captions of 8 to 13 words: 10 to 15 BERT tokens, 12.4 on average (the BERT vocabulary has their words).
# world.py's byte tokenizer makes one LLM token per character, so every caption fills max_txt_len = 32 text tokens
# (OPT's BPE would make about 15): the LLM runs 32 + 32 positions (its share of the small and real steps is therefore
# on the high side).
CAPTIONS = ["a man riding a wave on top of a surfboard in the ocean", "two dogs playing with a frisbee on the grass",
            "a plate of food with broccoli and rice on a wooden table", "a red double decker bus driving down a street",
            "a cat sitting on a laptop keyboard next to a cup of coffee", "a group of people standing around a kitchen",
            "an airplane flying over a city under a blue sky", "a little girl holding an umbrella in the rain"]


def autocast():
    """train_common's autocast (CUDA, half dtypes); on CPU also for bfloat16/float16, which train_common leaves out"""
    if device.startswith("cuda") or dtype == "float32":
        return tc.autocast_context(device, dtype)
    return torch.autocast("cpu", dtype=tc.DTYPES[dtype])


def sync():
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def now():
    sync()
    return time.perf_counter()


@contextlib.contextmanager
def quiet():
    with open(os.devnull, "w") as f, contextlib.redirect_stdout(f):
        yield


# -----------------------------------------------------------------------------
# models at a named size, with random weights


def sizes(depth=0):
    """The size's dimensions; llm_layers / vit_layers, or `depth` for both, override the ViT and LLM depths."""
    s = dict(SIZES[size])
    if depth or llm_layers:
        s["llm"] = (s["llm"][0], depth or llm_layers, *s["llm"][2:])
    if depth or vit_layers:
        s["vit"] = (s["vit"][0], depth or vit_layers, *s["vit"][2:])
    return s


def tokenizers(tmp):
    """world.py's BERT WordPiece tokenizer (as a directory) and OPT-style byte tokenizer: their ids stay below
    every size's vocabularies."""
    from world import WORDS, bert_tokenizer, byte_tokenizer

    bert_tokenizer(os.path.join(tmp, "bert"), words=WORDS + [w for c in CAPTIONS for w in c.split()])
    return os.path.join(tmp, "bert"), byte_tokenizer()


def opt_config(s):
    from transformers import OPTConfig

    d, L, H, F = s["llm"]
    return OPTConfig(hidden_size=d, ffn_dim=F, num_hidden_layers=L, num_attention_heads=H, vocab_size=s["llm_vocab"],
                     max_position_embeddings=2048, word_embed_proj_dim=d, pad_token_id=1, bos_token_id=2,
                     eos_token_id=2)


def our_config(s, bert):
    from model import Blip2Config

    d, L, H, F = s["vit"]
    qd, qL, qH, qF = s["qformer"]
    half = dtype  # frozen weights in half precision when dtype is (as BLIP-2 on GPUs)
    return Blip2Config(vit_layers=L, vit_pretrained="", vit_kwargs=dict(patch_size=s["patch"], embed_dim=d, depth=L,
                       num_heads=H, mlp_ratio=F / d), vit_dtype=half, image_size=s["image"], bert=bert,
                       num_query_tokens=s["queries"], hidden_size=qd, num_layers=qL,
                       num_heads=qH, intermediate_size=qF, vocab_size=s["bert_vocab"], embed_dim=s["embed_dim"],
                       llm_dtype=half)


def hf_blip2(s):
    """transformers' Blip2ForConditionalGeneration of this size; the image token is the last LLM id."""
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig

    from transformers import Blip2ForConditionalGeneration

    d, L, H, F = s["vit"]
    qd, qL, qH, qF = s["qformer"]
    vision = Blip2VisionConfig(hidden_size=d, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H,
                               image_size=s["image"], patch_size=s["patch"], qkv_bias=True, layer_norm_eps=1e-6)
    qformer = Blip2QFormerConfig(hidden_size=qd, num_hidden_layers=qL, num_attention_heads=qH, intermediate_size=qF,
                                 cross_attention_frequency=2, encoder_hidden_size=d, vocab_size=s["bert_vocab"])
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                         text_config=opt_config(s).to_dict(), num_query_tokens=s["queries"],
                         image_token_index=s["llm_vocab"] - 1)
    return Blip2ForConditionalGeneration(config)


def frozen_llm(s, tok):
    from transformers import OPTForCausalLM

    from backbones import DTYPES, FrozenLLM

    return FrozenLLM(OPTForCausalLM(opt_config(s)).to(DTYPES[dtype]), tok)


def build(stage_, s, tmp, with_hf=None):
    """(our model, the HF reference or None, loss function, {part: [modules]}). The parts: the frozen ViT and LLM,
    and the trainable part: the Q-Former with ln_vision and llm_proj or the stage-1 heads, or the P-Former.
    with_hf: build the HF reference for stage 2 (default: compare_hf)."""
    bert, tok = tokenizers(tmp)
    config = our_config(s, bert)
    with torch.device(device):  # built in place: the real sizes' random init is minutes on a CPU, not on a GPU
        model, hf, parts = _build(stage_, s, config, tok, compare_hf if with_hf is None else with_hf)
    model.to(device)
    loss_fn = (lambda m, b: m(b["text"])) if stage_ == 0 else (lambda m, b: m(b["image"], b["text"]))
    return model, hf, loss_fn, parts


def _build(stage_, s, config, tok, with_hf):
    from model import Blip2Stage1, Blip2Stage2, PFormerStage0
    from pretrained import blip2_stage2_from_hf

    hf = None
    if stage_ == 0:
        model = PFormerStage0(config, llm=frozen_llm(s, tok))
        parts = {"p-former": [model.pformer], "llm": [model.llm.model]}
    elif stage_ == 1:
        model = Blip2Stage1(config)
        parts = {"vit": [model.visual], "q-former": [model.ln_vision, *model.qformer.layers, model.vision_proj,
                                                      model.text_proj, model.itm_head, model.itg_head]}
    else:
        if with_hf:  # the reference first, then ours with its very weights (and its LLM module, shared)
            hf = hf_blip2(s)
            model = blip2_stage2_from_hf(hf, tokenizer=tok, dtype=config.vit_dtype, bert=config.bert)
            freeze_like_blip2(hf)
        else:
            model = Blip2Stage2(config, llm=frozen_llm(s, tok))
        parts = {"vit": [model.visual], "q-former": [model.ln_vision, *model.qformer.layers, model.llm_proj],
                 "llm": [model.llm.model]}
    return model, hf, parts


def freeze_like_blip2(hf):
    """BLIP-2's training state of the HF model: the vision tower and the LLM frozen, in eval mode and, with a half
    dtype, in half precision (LayerNorms fp32, as FrozenViT); trainable: query tokens, Q-Former, language
    projection, and the vision tower's post_layernorm, which is BLIP-2's ln_vision."""
    from backbones import DTYPES

    hf.requires_grad_(False)
    for m in (hf.query_tokens, hf.qformer, hf.language_projection, hf.vision_model.post_layernorm):
        m.requires_grad_(True)
    if dtype != "float32":
        for name, p in hf.vision_model.named_parameters():
            if not name.startswith("post_layernorm") and ("layer_norm" not in name):
                p.data = p.data.to(DTYPES[dtype])  # as FrozenViT: half weights, LayerNorms fp32
        hf.language_model.to(DTYPES[dtype])  # shared with our model, which has the same
    hf.train()  # Q-Former dropout on, as in ours
    hf.vision_model.eval()
    hf.language_model.eval()


# -----------------------------------------------------------------------------
# batches, and the reference's inputs


def make_batch(s, g):
    images = torch.randn(batch_size, 3, s["image"], s["image"], generator=g)
    # each caption once in every len(CAPTIONS) samples, in random order: a batch of 8 or more has them all
    texts = [CAPTIONS[int(i) % len(CAPTIONS)] for i in torch.randperm(batch_size, generator=g)]
    return {"image": images, "text": texts}


def to_device(batch):
    return {"image": batch["image"].to(device, non_blocking=True), "text": batch["text"]}


def hf_inputs(hf, tok, batch):
    """HF's own input format: [image token] * Q + BOS + caption + "\\n", right-padded, at most
    32 text tokens; labels -100 on the queries and the padding; the loss is HF's shifted LM loss."""
    Q = hf.config.num_query_tokens
    tok.padding_side = "right"
    t = tok([c + "\n" for c in batch["text"]], padding="longest", truncation=True, max_length=32, return_tensors="pt")
    ids = torch.cat([torch.full((len(batch["text"]), Q), hf.config.image_token_index), t.input_ids], 1)
    mask = torch.cat([torch.ones(len(batch["text"]), Q, dtype=torch.long), t.attention_mask], 1)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :Q] = -100
    return dict(pixel_values=batch["image"], input_ids=ids.to(device), attention_mask=mask.to(device),
                labels=labels.to(device))


# -----------------------------------------------------------------------------
# timing


def part_times(model, optimizer, loss_fn, batches, parts):
    """Forward time of each part (a list of modules) and of stage 0's VQ term, per step, from torch.profiler: each
    part's forward runs inside a record_function range opened and closed by module hooks (the VQ term inside one
    wrapped around PFormerStage0.vq_loss). Eager only: under torch.compile, hooks inside compiled code would break
    its graphs and time something else."""
    from torch.profiler import ProfilerActivity, profile, record_function

    ranges, handles = {}, []

    def enter(name):
        ranges.setdefault(name, []).append(record_function(f"part:{name}").__enter__())

    def leave(name):
        ranges[name].pop().__exit__(None, None, None)

    for name, modules in parts.items():
        for m in modules:
            handles.append(m.register_forward_pre_hook(lambda *_, n=name: enter(n)))
            handles.append(m.register_forward_hook(lambda *_, n=name: leave(n)))
    if hasattr(model, "vq_loss"):
        vq = model.vq_loss

        def timed(*args):
            with record_function("part:vq"):
                return vq(*args)
        model.vq_loss = timed
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    try:
        with profile(activities=activities) as prof:
            for batch in batches:
                step(model, optimizer, loss_fn, batch)
    finally:
        for h in handles:
            h.remove()
        model.__dict__.pop("vq_loss", None)
    times = {}
    for event in prof.key_averages():
        if event.key.startswith("part:"):  # GPU time where there is one, else the CPU's
            us = event.device_time_total if device.startswith("cuda") else event.cpu_time_total
            times[event.key[5:]] = us / 1e6 / len(batches)
    return times


def step(model, optimizer, loss_fn, batch_cpu):
    """One training step; returns {phase: seconds}. Synchronised only at the phase boundaries."""
    t0 = now()
    batch = to_device(batch_cpu)
    t1 = now()
    with autocast():
        loss = loss_fn(model, batch)["loss"]
    t2 = now()
    loss.backward()
    t3 = now()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t4 = now()
    return dict(data=t1 - t0, forward=t2 - t1, backward=t3 - t2, optimizer=t4 - t3)


def hf_loss_fn(tok):
    def loss_fn(hf, batch):
        return {"loss": hf(**hf_inputs(hf, tok, batch)).loss}
    return loss_fn


def count_flops(model, loss_fn, batch, parts):
    """FLOPs of one step by part: {part: [forward, backward]}, plus 'vq' (stage 0) and 'rest' (the forward outside
    the parts: losses, embeddings)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    total = lambda: sum(counter.get_flop_counts().get("Global", {}).values())  # noqa: E731
    paths = {path: part for part, modules in parts.items() for path, m in model.named_modules()
             if any(m is x for x in modules)}

    def by_part():
        counts, root = counter.get_flop_counts(), type(model).__name__
        got = {part: 0 for part in parts}
        for path, part in paths.items():
            got[part] += sum(counts.get(f"{root}.{path}", {}).values())
        return got

    # Backward: the frozen ViT has none (no autograd); the frozen LLM's (input gradients, down to the soft prompt) is
    # read off the running total when the gradient of its input embeddings is ready: the LLM is the last part of the
    # forward, hence the first of the backward. The rest of the backward is the trainable part's (and its heads').
    # (The counter's own module tracking loses track in the backward of modules whose inputs need no gradient or
    # come as keyword arguments, so it is used for the forward only.)
    llm_bwd, vq, handles = [], [], []
    if "llm" in parts:
        def on_llm_input(module, args, kwargs):
            x = kwargs.get("inputs_embeds")
            if x is not None and x.requires_grad:
                x.register_hook(lambda g: llm_bwd.append(total()))
        handles.append(parts["llm"][0].register_forward_pre_hook(on_llm_input, with_kwargs=True))
    if hasattr(model, "vq_loss"):
        vq_loss = model.vq_loss

        def counted(*args):
            before = total()
            out = vq_loss(*args)
            vq.append(total() - before)
            return out
        model.vq_loss = counted
    # stage 1 computes its images' keys and values (QFormer.read_image) outside any layer's forward: added here
    read_image, image_reads = None, []
    if "q-former" in parts and hasattr(model, "qformer"):
        read_image, patched = model.qformer.read_image, model.qformer.__dict__.get("read_image")

        def read_counted(*args):
            before = total()
            out = read_image(*args)
            image_reads.append(total() - before)
            return out
        model.qformer.read_image = read_counted
    try:
        with counter:
            with autocast():
                loss = loss_fn(model, to_device(batch))["loss"]
            fwd, fwd_total = by_part(), total()
            loss.backward()
        bwd_total = total() - fwd_total
    finally:
        for h in handles:
            h.remove()
        model.__dict__.pop("vq_loss", None)
        if read_image is not None:  # the class's method again, or what was patched in (stage1_as_before)
            model.qformer.__dict__.pop("read_image")
            if patched is not None:
                model.qformer.read_image = patched
    if image_reads:
        fwd["q-former"] += sum(image_reads)
    out = {part: [fwd[part], 0] for part in parts}
    if llm_bwd:
        out["llm"][1] = llm_bwd[0] - fwd_total
    trainable = next(p for p in parts if p not in ("vit", "llm"))
    out[trainable][1] = bwd_total - sum(b for _, b in out.values())
    if vq:
        out["vq"] = [vq[0], 0]  # the nearest-neighbour search runs without gradient; the MSE has no matmul
    out["rest"] = [fwd_total - sum(f for f, _ in out.values()), 0]
    model.zero_grad(set_to_none=True)
    return out


def flops_at_full_depth(stage_):
    """FLOPs of one batch by part, {part: [forward, backward]}, at the size's full ViT and LLM depths, counted on
    models of the same widths with 1 and 2 ViT and LLM layers: every layer of a part does the same work, so a part
    costs fixed + depth x per-layer, exactly (not a fit); on fake tensors (shapes without values, no arithmetic). A
    real-size step is minutes on a CPU and needs more memory than a laptop has; these two take seconds."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    full = {"vit": sizes()["vit"][1], "llm": sizes()["llm"][1]}
    batch = make_batch(sizes(), torch.Generator().manual_seed(seed))
    counted = []
    for depth in (1, 2):
        torch.manual_seed(seed)
        with tempfile.TemporaryDirectory() as tmp, quiet():
            model, _, loss_fn, parts = build(stage_, sizes(depth), tmp, with_hf=False)
        model.train()
        with FakeTensorMode(allow_non_fake_inputs=True):
            counted.append(count_flops(model, loss_fn, batch, parts))
        del model
    one, two = counted
    return {part: [a + (full.get(part, 1) - 1) * (b - a) for a, b in zip(one[part], two[part])] for part in one}


def print_flops_only(stage_):
    flops = flops_at_full_depth(stage_)
    s = sizes()
    print(f"\n=== stage {stage_}, size {size}: FLOPs at full depth (ViT {s['vit'][1]}, LLM {s['llm'][1]} layers), "
          f"from 1- and 2-layer models, batch {batch_size}")
    print_flops(flops)
    per_sample = sum(f + b for f, b in flops.values()) / batch_size
    print("samples/s per GPU at 100% / 50% MFU: " + " | ".join(
        f"{name} {peak / per_sample:.0f} / {0.5 * peak / per_sample:.0f}" for name, peak, _ in tc.PEAK_FLOPS
        if name in ("H100", "A100")) + " (dense bf16 peaks)")
    result = dict(stage=stage_, flops=flops, flops_per_sample=per_sample)
    if stage_ == 1:  # the variants differ after the ViT: a model with a 1-block ViT, fed its output
        torch.manual_seed(seed)
        with tempfile.TemporaryDirectory() as tmp, quiet():
            model, _, loss_fn, parts = build(1, sizes(depth=1), tmp, with_hf=False)
        result["ddp"] = stage1_ddp_flops(model.train(), loss_fn, make_batch(s, torch.Generator().manual_seed(seed)),
                                         parts)
        print_stage1_flops(result["ddp"])
    return result


# -----------------------------------------------------------------------------
# stage 1 under DDP, before and after each rank padded its text to its own longest caption and each image's keys and
# values were computed once per step

STAGE1_RANKS = 8  # the papers' 8 GPUs


@contextlib.contextmanager
def stage1_as_before(model):
    """Stage 1 computed as it was under DDP (and as LAVIS does): text padded to max_txt_len, and every pass that reads
    an image (the query pass and ITM's three pairs) projecting its keys and values anew. The same losses and gradients
    (tests/test_model.py), more work."""
    def padded(captions, device):
        t = model.tokenizer(captions, padding="max_length", truncation=True, max_length=model.config.max_txt_len,
                            return_tensors="pt")
        return t.input_ids.to(device), t.attention_mask.to(device)

    saved = model.qformer.__dict__.get("read_image")
    model.qformer.read_image = lambda image_embeds: image_embeds  # features: each pass's layers project them
    model.tokenize = padded
    try:
        yield model
    finally:
        del model.tokenize, model.qformer.read_image
        if saved is not None:
            model.qformer.read_image = saved


@contextlib.contextmanager
def simulated_ranks(world):
    """model.py's collectives as on rank 0 of `world` ranks whose batches are copies of this one, in one process: a
    step then does what a rank's does under DDP (ITC against the global batch, ITM's negatives drawn from it, their
    images' keys and values computed from the gathered features, the negative texts at the longest length of all
    ranks), so its FLOPs are a rank's. (The other ranks' captions are as long as this one's.)"""
    import model as model_py

    fakes = dict(rank_and_world_size=lambda: (0, world), gather_no_grad=lambda x: torch.cat([x.detach()] * world),
                 gather_with_grad=lambda x: torch.cat([x] * world), max_over_ranks=lambda n: n)
    saved = {name: getattr(model_py, name) for name in fakes}
    for name, fake in fakes.items():
        setattr(model_py, name, fake)
    try:
        yield
    finally:
        for name, real in saved.items():
            setattr(model_py, name, real)


def stage1_ddp_flops(model, loss_fn, batch, parts):
    """{"before": FLOPs by part, "after": ...} of one step as on one of STAGE1_RANKS ranks, counted on fake tensors
    (shapes without values: seconds at the real size, and a step that read a value on the host would fail here).
    The step reads the ViT's output (zeros) instead of images: the two variants differ only after it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    batch = dict(batch, image=torch.zeros(len(batch["text"]), model.visual.num_tokens, model.visual.width))
    ddp = {}
    with simulated_ranks(STAGE1_RANKS):
        for name in ("before", "after"):
            with stage1_as_before(model) if name == "before" else contextlib.nullcontext():
                with FakeTensorMode(allow_non_fake_inputs=True):
                    ddp[name] = count_flops(model, loss_fn, batch, parts)
    return ddp


def print_stage1_flops(ddp):
    """The Q-Former's FLOPs per sample before and after, as on one of STAGE1_RANKS ranks."""
    per_sample = {name: sum(ddp[name]["q-former"]) / batch_size for name in ddp}
    print(f"stage 1 as on 1 of {STAGE1_RANKS} ranks, batch {batch_size} per rank; before: text padded to max_txt_len "
          f"and image keys and values projected in each of 4 passes; after: text padded to the rank's longest caption "
          f"and keys and values computed once per image (twice for ITM's negative images)")
    for name in ("before", "after"):
        print(f"  {name}: ", end="")
        print_flops(ddp[name])
    print(f"  Q-Former GFLOP per sample: before {per_sample['before'] / 1e9:.4g}, after {per_sample['after'] / 1e9:.4g}"
          f" ({100 * (per_sample['after'] / per_sample['before'] - 1):+.1f}%)")


def compare_stage1(model, optimizer, loss_fn, batches, parts):
    """FLOPs (counted) and CPU/GPU step time of stage 1 before and after, as on one of STAGE1_RANKS ranks: the two
    variants' steps interleaved on the same model and batches (a drift of a shared machine hits both alike)."""
    ddp = stage1_ddp_flops(model, loss_fn, batches[0], parts)
    with simulated_ranks(STAGE1_RANKS):
        times = {"before": [], "after": []}
        for i in range(warmup + steps):
            for name in ("after", "before"):
                with stage1_as_before(model) if name == "before" else contextlib.nullcontext():
                    t = step(model, optimizer, loss_fn, batches[i])
                if i >= warmup:
                    times[name].append(sum(t.values()))
    print_stage1_flops(ddp)
    ratio = statistics.median(times["after"]) / statistics.median(times["before"])
    fastest = min(times["after"]) / min(times["before"])
    print(f"  step time after / before: {ratio:.3f} (median of {steps} interleaved steps each), {fastest:.3f} "
          f"(fastest steps)")
    return dict(ddp=ddp, ddp_step_ratio=ratio, ddp_step_ratio_fastest=fastest)


def peak_memory():
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30, "GiB allocated (CUDA)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "GiB RSS (process peak)"


def summarize(times):
    """Median of each phase and of the step total over the timed steps, and the fastest step."""
    phases = {k: statistics.median([t[k] for t in times]) for k in times[0]}
    totals = [sum(t.values()) for t in times]
    return statistics.median(totals), min(totals), phases


def cache_features(model, batches):
    """Precompute the frozen ViT's output for each batch (a run without augmentation can do it once for all
    epochs, e.g. on disk); the step then reads B x N x width features in place of images."""
    with torch.no_grad(), autocast():
        for b in batches:
            b["image"] = model.visual(b["image"].to(device)).cpu()


def time_steps(model, optimizer, loss_fn, batches, hf=None, hf_opt=None, hf_loss=None, hf_batches=None):
    """Time every step (ours, and the HF reference's interleaved with them, so that drifts of a shared machine hit
    both alike); returns (our timed steps, theirs, peak memory, its unit). The first `warmup` steps are not kept."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    ours, theirs = [], []
    for i in range(warmup + steps):
        t = step(model, optimizer, loss_fn, batches[i])
        if i >= warmup:
            ours.append(t)
        if hf is not None:
            t = step(hf, hf_opt, hf_loss, hf_batches[i])
            if i >= warmup:
                theirs.append(t)
    return ours, theirs, *peak_memory()


def report(stage_, ours, parts_s, flops, flops_per_sample, mem, mem_unit):
    """Print our step: time and phases, forward by part, FLOPs, MFU, memory; return them as a dict."""
    total, fastest, phases = summarize(ours)
    print(f"step {total * 1e3:.1f} ms (fastest {fastest * 1e3:.1f}) | {batch_size / total:.2f} samples/s | "
          + " | ".join(f"{k} {v * 1e3:.1f} ms" for k, v in phases.items()))
    print("forward by part: " + (" | ".join(f"{k} {v * 1e3:.1f} ms ({100 * v / phases['forward']:.0f}%)"
                                            for k, v in parts_s.items()) or "run without --compile to see it"))
    if "vq" in parts_s:
        print(f"VQ term: {parts_s['vq'] * 1e3:.1f} ms = {100 * parts_s['vq'] / total:.2f}% of the stage-0 step, "
              f"{100 * sum(flops['vq']) / (flops_per_sample * batch_size):.2f}% of its FLOPs")
    print_flops(flops)
    m = tc.mfu(flops_per_sample, batch_size / total, device)
    print(f"achieved {flops_per_sample * batch_size / total / 1e12:.3g} TFLOP/s | MFU "
          + ("n/a (CPU, or a GPU not in PEAK_FLOPS)" if m is None else f"{100 * m:.1f}%")
          + f" | peak memory {mem:.2f} {mem_unit}")
    return dict(stage=stage_, step_s=total, fastest_s=fastest, samples_per_sec=batch_size / total, phases=phases,
                parts=parts_s, flops=flops, flops_per_sample=flops_per_sample, mfu=m, peak_memory=mem)


def bench_stage(stage_):
    s = sizes()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp, quiet():
        model, hf, loss_fn, parts = build(stage_, s, tmp)
        optimizer = tc.make_optimizer(model, lr=1e-4, weight_decay=0.05, betas=(0.9, 0.98), device=device)
        hf_opt = tc.make_optimizer(hf, lr=1e-4, weight_decay=0.05, betas=(0.9, 0.98), device=device) if hf else None
    model.train()
    batches = [make_batch(s, g) for _ in range(warmup + steps)]
    cached = cache and stage_ != 0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    print(f"\n=== stage {stage_}, size {size}: batch {batch_size}, {device} {dtype}"
          f"{', compiled' if compile else ''}{', HF compiled' if compile_hf and hf else ''}"
          f"{', cached ViT features' if cached else ''}, "
          f"{trainable / 1e6:.1f}M trainable + {frozen / 1e6:.1f}M frozen parameters")
    hf_loss = hf_loss_fn(model.llm.tokenizer) if hf is not None else None
    if hf is not None:
        check_same_loss(model, hf, hf_loss, loss_fn, batches[0])
    hf_batches = [dict(b) for b in batches]  # images, also when ours reads cached features
    if cached:
        cache_features(model, batches)
    flops = count_flops(model, loss_fn, batches[0], parts)  # eager, before any compile
    flops_per_sample = sum(f + b for f, b in flops.values()) / batch_size
    hf_flops_per_sample = total_flops(hf, hf_loss, hf_batches[0]) / batch_size if hf is not None else None
    if compile:
        tc.compile_blocks(model)
    if compile_hf and hf is not None:  # the reference's blocks: vision tower, Q-Former, LLM
        for m in (hf.vision_model, hf.qformer, hf.language_model):
            m.compile()

    ours, theirs, mem, mem_unit = time_steps(model, optimizer, loss_fn, batches, hf, hf_opt, hf_loss, hf_batches)
    # the forward by part, in extra steps under torch.profiler (eager runs only)
    parts_s = {} if compile else part_times(model, optimizer, loss_fn, batches[-min(steps, 3):], parts)
    result = report(stage_, ours, parts_s, flops, flops_per_sample, mem, mem_unit)
    if stage_ == 1 and not compile:
        result.update(compare_stage1(model, optimizer, loss_fn, batches, parts))
    if theirs:
        total, fastest = result["step_s"], result["fastest_s"]
        hf_total, hf_fastest, hf_phases = summarize(theirs)
        print(f"HF Blip2ForConditionalGeneration: step {hf_total * 1e3:.1f} ms (fastest {hf_fastest * 1e3:.1f}) | "
              f"{batch_size / hf_total:.2f} samples/s | {hf_flops_per_sample / 1e9:.4g} GFLOP per sample | "
              + " | ".join(f"{k} {v * 1e3:.1f} ms" for k, v in hf_phases.items()))
        print(f"ours / HF step time: {total / hf_total:.3f} (median steps), {fastest / hf_fastest:.3f} (fastest steps)"
              + (" [ours reads cached features, HF runs its ViT]" if cached else ""))
        result.update(hf_step_s=hf_total, ratio=total / hf_total, ratio_fastest=fastest / hf_fastest,
                      hf_flops_per_sample=hf_flops_per_sample)
    return result


def print_flops(flops):
    print("GFLOP per sample, forward + backward: " + " | ".join(
        f"{k} {f / 1e9 / batch_size:.4g} + {b / 1e9 / batch_size:.4g}" for k, (f, b) in flops.items())
        + f" | total {sum(f + b for f, b in flops.values()) / 1e9 / batch_size:.4g}")


def total_flops(model, loss_fn, batch):
    """FLOPs of one forward + backward (the HF reference's, for comparison)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        with autocast():
            loss_fn(model, to_device(batch))["loss"].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def check_same_loss(model, hf, hf_loss, loss_fn, batch):
    """The two models compute the same loss on the benchmark batch (eval mode: no dropout)."""
    model.eval(), hf.eval()
    with torch.no_grad(), autocast():
        a, b = loss_fn(model, to_device(batch))["loss"].item(), hf_loss(hf, to_device(batch))["loss"].item()
    model.train()
    freeze_like_blip2(hf)
    print(f"same weights and batch, eval mode: our loss {a:.6f}, HF loss {b:.6f}")


def main():
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    if stage not in (0, 1, 2, None, "all"):
        raise ValueError(f"stage must be 0, 1, 2 or 'all', got {stage!r}")
    if threads:
        torch.set_num_threads(threads)
    if device.startswith("cuda"):  # as the train scripts (distributed.setup_distributed): TF32 for float32 products
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    stages = [0, 1, 2] if stage in (None, "all") else [int(stage)]
    # the numbers below depend on all of these: a line to paste next to them
    print("provenance: " + " | ".join(f"{k} {v}" for k, v in provenance(device).items()))
    return [(print_flops_only if flops_only else bench_stage)(s) for s in stages]


if __name__ == "__main__":
    apply_overrides(globals(), sys.argv[1:])
    main()
