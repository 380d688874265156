"""The P-Former paper's video recipe with the official video code's bridge (bridge="bert"): clip features ->
Linear -> a BERT encoder over the segments (its frozen embedding block applied) -> llm_proj -> the frozen OPT.
Checked against an independent computation written from the official code (BLIText-video's video_feature_opt*.py):
transformers' BertModel run on inputs_embeds with the padding as its attention mask, zero-padded features, every
output position kept; the P-Former target computed as its Darkformer does; OPT's own loss on the official labels."""
import re

import pytest
import torch
import torch.nn as nn
from transformers import BertModel, BertTokenizer

import tiny
from model import Blip2Stage1, Blip2Stage2, PFormer
from backbones import FrozenLLM
from pretrained import blip2_language_projection, init_from_bert

S, F_DIM = 8, 12  # segments (= soft prompts = the P-Former's prompts) and feature width
CAPTIONS = ["a red square moves left", "two blue stars"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return tiny.bert_dir(str(tmp_path_factory.mktemp("bert")))


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    """A tiny HF BLIP-2 with OPT, saved: its OPT is the frozen LLM, its language projection the official start."""
    hf, tok = tiny.hf_blip2("opt")
    d = str(tmp_path_factory.mktemp("blip2"))
    hf.save_pretrained(d)
    return hf, tok, d


def config(bert, **kw):
    return tiny.our_config(bert, **{**dict(bridge="bert", feature_dim=F_DIM, num_frames=S, max_txt_len=32), **kw})


def features(seed=0):
    """Two clips of 5 and 8 real segments: (as this project's loader gives them: padded by repeating the last
    segment, with a mask; as the official loader gives them: zero-padded)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, S, F_DIM, generator=g)
    mask = torch.tensor([[1] * 5 + [0] * 3, [1] * S])
    ours = x.clone()
    ours[0, 5:] = x[0, 4]
    return ours, mask, x * mask[..., None]


# ---------------------------------------------------------------- the official computation, written independently

_OFFICIAL_NAMES = [  # transformers BertModel -> our BertBridge layer names
    (r"encoder\.layer\.(\d+)\.attention\.self\.", r"qformer.layers.\1.self_attn."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"qformer.layers.\1.self_attn.out."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"qformer.layers.\1.self_attn.norm."),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"qformer.layers.\1.ffn_text.fc1."),
    (r"encoder\.layer\.(\d+)\.output\.dense\.", r"qformer.layers.\1.ffn_text.fc2."),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"qformer.layers.\1.ffn_text.norm."),
]


class OfficialVideoBridge(nn.Module):
    """VL_adaptor (a BertModel with feat_proj) and opt_proj, as BLIText-video builds them, sharing our weights."""

    def __init__(self, bert, ours):
        super().__init__()
        self.VL_adaptor = BertModel.from_pretrained(bert, add_pooling_layer=False)
        self.VL_adaptor.embeddings.requires_grad_(False)
        self.feat_proj = nn.Linear(F_DIM, self.VL_adaptor.config.hidden_size)
        self.opt_proj = nn.Linear(ours.llm_proj.in_features, ours.llm_proj.out_features)
        theirs = {**{f"VL_adaptor.{k}": k for k, _ in self.VL_adaptor.named_parameters()},
                  "feat_proj.weight": "visual.proj.weight", "feat_proj.bias": "visual.proj.bias",
                  "opt_proj.weight": "llm_proj.weight", "opt_proj.bias": "llm_proj.bias"}
        self.our_name = {}
        for name, key in theirs.items():
            for pattern, repl in _OFFICIAL_NAMES:
                key = re.sub(pattern, repl, key)
            if name.startswith("VL_adaptor.") and not key.startswith("qformer."):
                continue  # the frozen embedding block: BERT's own in both
            self.our_name[name] = key
        ours_sd = dict(ours.named_parameters())
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name in self.our_name:
                    p.copy_(ours_sd[self.our_name[name]])

    def forward(self, x, mask):
        image_output = self.VL_adaptor(attention_mask=mask, inputs_embeds=self.feat_proj(x))
        return self.opt_proj(image_output.last_hidden_state)  # B x 32 x d_LLM, padded positions included

    def grads(self):
        """Our names -> the gradients of the weights the official code trains."""
        return {self.our_name[n]: p.grad for n, p in self.named_parameters() if n in self.our_name}


def official_lm_loss(opt, tok, inputs_opt, captions, prompt="a photo of"):
    """video_feature_opt_stage2.forward: text "a photo of " + caption + "\\n" (the text processor's prompt), right
    padded, pad -> -100, the prompt's tokens (with BOS) -> -100, 32 x -100 for the soft prompt, OPT's own loss."""
    tok.padding_side = "right"
    t = tok([f"{prompt} {c}\n" for c in captions], return_tensors="pt", padding="longest", truncation=True,
            max_length=32)
    targets = t.input_ids.masked_fill(t.input_ids == tok.pad_token_id, -100)
    targets[:, : tok(prompt, return_tensors="pt").attention_mask.sum(1)] = -100
    targets = torch.cat([torch.full(inputs_opt.shape[:2], -100), targets], dim=1)
    embeds = torch.cat([inputs_opt, opt.get_input_embeddings()(t.input_ids)], dim=1)
    attention = torch.cat([torch.ones(inputs_opt.shape[:2], dtype=torch.long), t.attention_mask], dim=1)
    return opt(inputs_embeds=embeds, attention_mask=attention, labels=targets).loss


def official_pformer_target(bert, pformer, captions, prefix="a photo of "):
    """video_feature_opt_stage1's Darkformer: BERT on text + "\\n" padded to max_length, its [CLS] -> cls_proj ->
    reshape by the text length -> pooler (Linear + Tanh) -> opt_proj."""
    darkformer = BertModel.from_pretrained(bert, add_pooling_layer=False).eval()
    tokenizer = BertTokenizer.from_pretrained(bert)
    t = tokenizer([prefix + c + "\n" for c in captions], padding="max_length", truncation=True,
                  max_length=pformer.config.max_txt_len, return_tensors="pt")
    with torch.no_grad():
        h = darkformer(t.input_ids, attention_mask=t.attention_mask).last_hidden_state
        bsz, n_query, hdim = h.shape
        ref = pformer.cls_proj(h[:, 0]).reshape(bsz, n_query, hdim)
        return pformer.llm_proj(torch.tanh(pformer.prompt_proj(ref)))


def trained_pformer(bert):
    """A P-Former whose encoder is the tiny BERT (as a stage-0 run would start it), its heads perturbed."""
    torch.manual_seed(1)
    pformer = init_from_bert(PFormer(tiny.our_config(bert, max_txt_len=S), llm_dim=tiny.HIDDEN), bert)
    for head in (pformer.cls_proj, pformer.prompt_proj, pformer.llm_proj):
        tiny.perturb(head, std=0.3, seed=3)
    return pformer.eval()


def perturbed(model):
    """Random offsets on every trainable weight, so that every weight's place shows in the outputs."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.train()


def close_grads(model, official, tol=1e-5):
    ours = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    theirs = official.grads()
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    for name in ours:
        tiny.close(ours[name], theirs[name], tol)


# ---------------------------------------------------------------- the tests


def test_bert_bridge_is_the_official_bridge_in_each_stage_of_the_recipe(bert, blip2):
    """Stage 1 (100 x alignment alone), stage 2 (LM loss alone) and the baseline (stage 2 from BERT, no P-Former):
    losses and the gradients of every trained weight as the official code computes them, to 1e-5."""
    hf, tok, _ = blip2
    ours_x, mask, official_x = features()
    llm = FrozenLLM(hf.language_model, tok, prompt="a photo of", max_txt_len=32)
    pformer = trained_pformer(bert)
    # stage 1: the alignment alone, to the target of "a photo of " + caption
    torch.manual_seed(0)
    stage1 = perturbed(Blip2Stage1(config(bert, stage1_losses=(), align_weight=100.0, align_prefix="a photo of "),
                                   pformer=pformer))
    official = OfficialVideoBridge(bert, stage1).train()
    out = stage1(ours_x, CAPTIONS, frame_mask=mask)
    target = official_pformer_target(bert, pformer, CAPTIONS)
    reference = 100 * nn.MSELoss()(official(official_x, mask), target)
    tiny.close(out["loss"], reference)
    out["loss"].backward()
    reference.backward()
    close_grads(stage1, official)
    # stage 2 from stage 1's weights, and the baseline: stage 2 built from BERT alone
    for from_stage1 in (True, False):
        torch.manual_seed(0)
        stage2 = Blip2Stage2(config(bert), llm=llm).train()
        if from_stage1:
            stage2.load_stage1({n: p for n, p in stage1.named_parameters() if p.requires_grad}, "stage 1")
        official = OfficialVideoBridge(bert, stage2).train()
        out = stage2(ours_x, CAPTIONS, frame_mask=mask)
        reference = official_lm_loss(hf.language_model, tok, official(official_x, mask), CAPTIONS)
        tiny.close(out["loss"], reference)
        out["loss"].backward()
        reference.backward()
        close_grads(stage2, official)
    # 87,810,304 at full size: Linear(1024 -> 768), BERT-base's 12 layers, Linear(768 -> 2560)
    n = sum(p.numel() for p in stage2.parameters() if p.requires_grad)
    layer = sum(p.numel() for p in official.VL_adaptor.encoder.layer[0].parameters())
    assert n == (F_DIM + 1) * tiny.HIDDEN + 2 * layer + (tiny.HIDDEN + 1) * tiny.HIDDEN


def test_segment_order_matters_and_bad_configs_fail(bert):
    """BERT's position embeddings order the segments (the Q-Former over segments ignores their order at start);
    the bridge reads clip features, gives one prompt per segment, and has no text path for ITC / ITM / ITG."""
    torch.manual_seed(0)
    model = Blip2Stage1(config(bert, stage1_losses=()), pformer=trained_pformer(bert)).eval()
    x = features()[0]
    z = model.query_outputs(x)
    assert (z.flip(1) - model.query_outputs(x.flip(1))).abs().max() > 1e-2
    with pytest.raises(ValueError, match="feature_dim"):
        Blip2Stage1(config(bert, stage1_losses=(), feature_dim=0), pformer=trained_pformer(bert))
    with pytest.raises(ValueError, match="num_frames"):
        Blip2Stage1(config(bert, stage1_losses=(), num_frames=4), pformer=trained_pformer(bert))
    with pytest.raises(ValueError, match="no text path"):
        Blip2Stage1(config(bert, stage1_losses=("itc",)))
    with pytest.raises(ValueError, match="bridge="):
        Blip2Stage1(config(bert, bridge="mlp"))


def test_pformer_dropout_option_and_llm_proj_from_blip2(bert, blip2):
    """pformer_dropout=True: the teacher's targets carry dropout while the model trains (the official runs); off by
    default. llm_proj_init reads an official BLIP-2's language projection, and only that, from its files."""
    from dataclasses import replace

    hf, _, directory = blip2
    pformer = PFormer(replace(tiny.our_config(bert, max_txt_len=S), dropout=0.5), llm_dim=tiny.HIDDEN)
    for dropout in (False, True):
        model = Blip2Stage1(config(bert, stage1_losses=(), pformer_dropout=dropout), pformer=pformer).train()
        a, b = (model.pformer.target(CAPTIONS, "cpu") for _ in range(2))
        assert (a - b).abs().max() > 0 if dropout else torch.equal(a, b)
        model.eval()
        assert torch.equal(model.pformer.target(CAPTIONS, "cpu"), model.pformer.target(CAPTIONS, "cpu"))
    projection = blip2_language_projection(directory)
    assert torch.equal(projection["weight"], hf.language_projection.weight)
    assert torch.equal(projection["bias"], hf.language_projection.bias)
    with pytest.raises(ValueError, match="cannot read llm_proj"):
        blip2_language_projection(bert)


def test_vatex_recipe_trains_with_the_bert_bridge(bert, blip2, tmp_path):
    """The VATEX configs, shrunk: stage 1 (alignment alone, llm_proj from the BLIP-2 checkpoint) and stage 2 (LM
    alone) with bridge="bert" on a folder of clip features; both losses fall, and the trained stage-2 model's loss on
    a batch is the official code's loss for the same weights."""
    import dataclasses
    import json

    import numpy as np

    from checkpoints import from_checkpoint
    from scripts import run_script

    hf, tok, blip2_dir = blip2
    hf.language_model.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    pformer = trained_pformer(bert)
    torch.save(dict(stage=0, model={f"pformer.{k}": v for k, v in pformer.state_dict().items()},
                    config=dataclasses.asdict(pformer.config)), tmp_path / "pformer.pt")
    rng = np.random.default_rng(0)
    words = ["red", "blue", "square", "star", "left", "right"]
    ann = [{"video": f"v{i}.mp4", "caption": " ".join(rng.choice(words, 3)), "image_id": i} for i in range(16)]
    (tmp_path / "features").mkdir()
    for i in range(16):
        np.save(tmp_path / "features" / f"v{i}.npy", rng.standard_normal((5 + i % 4, F_DIM)).astype(np.float32))
    (tmp_path / "train.json").write_text(json.dumps(ann))
    common = [f"--train_ann=['{tmp_path}/train.json']", f"--train_image_roots=['{tmp_path}/features']",
              "--val_ann=[]", f"--bert={bert}", f"--feature_dim={F_DIM}", f"--num_frames={S}",
              f"--num_query_tokens={S}", "--hidden_size=64", "--num_layers=2", "--num_heads=4",
              "--intermediate_size=128", "--dropout=0.0", "--max_txt_len=32", "--batch_size=8", "--max_steps=24",
              "--lr_decay_steps=24", "--warmup_steps=2", "--lr=1e-3", "--min_lr=1e-4", "--log_interval=4",
              "--device=cpu", "--dtype=float32", "--num_workers=0"]
    run_script("train_stage1.py", "config/video_vatex_stage1_pformer.py", *common, "--embed_dim=32",
               f"--out_dir={tmp_path}/s1", f"--pformer_ckpt={tmp_path}/pformer.pt", f"--llm_proj_init={blip2_dir}")
    run_script("train_stage2.py", "config/video_vatex_stage2.py", *common, f"--out_dir={tmp_path}/s2",
               f"--stage1_ckpt={tmp_path}/s1/ckpt.pt", f"--llm_model={tmp_path}/llm", "--llm_dtype=float32")
    for stage, term, fall in (("s1", "align", 0.95), ("s2", "lm", 0.9)):  # tiny random models: slowly
        log = [json.loads(line) for line in open(tmp_path / stage / "log.jsonl")]
        losses = [r[term] for r in log if term in r]
        assert losses[-1] < fall * losses[0], (stage, losses)
    assert [r["lr"] for r in log if "lr" in r][-1] > 1e-4  # one value per epoch, never min_lr (12 epochs of 2)
    # the trained weights through the official computation
    model = from_checkpoint(str(tmp_path / "s2" / "ckpt.pt"), overrides={"llm_model": str(tmp_path / "llm")})
    ours_x, mask, official_x = features(seed=1)
    official = OfficialVideoBridge(bert, model).eval()
    with torch.no_grad():
        tiny.close(model(ours_x, CAPTIONS, frame_mask=mask)["loss"],
                   official_lm_loss(model.llm.model, model.llm.tokenizer, official(official_x, mask), CAPTIONS))
