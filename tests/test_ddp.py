"""DDP correctness: 2 gloo ranks with batch B/2 each, the model wrapped in DistributedDataParallel, give the
same losses and the same (all-reduced) gradients as 1 process with batch B.

Stage 1 is the interesting case: ITC gathers both sides from all ranks without gradient, ITM gathers the image
embeddings with gradient (hard negatives may come from another rank) and draws its negatives from a
`neg_generator` seeded alike on every rank. Stage 2 has no gathers and is the baseline: plain data parallelism.

The workers are started once per module (process start-up and imports dominate the run time) and run both stages;
the 1-process references are computed here, in the pytest process."""

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from transformers import BertTokenizerFast, PreTrainedTokenizerFast

from dev import bench
import distributed
import model as model_py
import tiny
from model import Blip2Stage1, PFormer
from pretrained import blip2_stage2_from_hf
from world import byte_tokenizer

pytestmark = pytest.mark.slow  # every rank is a process of its own (mp.spawn)

WORLD, B = 2, 4  # rank r holds samples r * B/2 ... (r + 1) * B/2 - 1
NEG_SEED = 123
# ITG (stage 1) and the LM loss (stage 2) are token means over each rank's own batch. DDP averages the ranks'
# losses (and gradients) with equal weights, which equals the global token mean only when every rank holds the
# same number of target tokens; so every caption has the same number of tokens (checked in the tests), padding
# aside. Q-Former WordPiece: [CLS] a <colour> <shape> [SEP], all words in the tiny vocabulary.
STAGE1_CAPTIONS = ["a red square", "a blue circle", "a green triangle", "a purple square"]
# the tiny OPT tokenizer is byte level: equal token counts = equal lengths in bytes (12 each)
STAGE2_CAPTIONS = ["a red square", "one blue box", "two big dots", "the tan star"]
# The two setups compute the same function and differ only in float32 summation order (batch split into per-rank
# partial sums, DDP's all-reduce and its division by the world size, the backward of the gathers), i.e. a few
# ulps (float32 eps = 1.2e-7) accumulated over the small tiny-model reductions. Observed: <= 1e-6 on the losses
# (about 8) and <= 2e-6 on the gradients, the largest on `temp`'s (about 7.5, it carries 1 / temp^2). rtol 1e-5
# covers such large entries; atol 1e-5 covers entries that are near-zero sums of larger terms, whose error scales
# with those terms, not with the entry (elementwise relative errors there reach 1e3). DDP bugs tried on a scratch
# copy of model.py (no all_reduce in gather_with_grad's backward, no rank offset in the ITC targets, a gather that
# returns local copies, every rank reading the first rows of the ITM noise) move losses or gradients by 1e-2 .. 0.3
# or change the negatives.
RTOL = ATOL = 1e-5


def images():
    return torch.randn(B, 3, tiny.IMAGE, tiny.IMAGE, generator=torch.Generator().manual_seed(0))


def build_stage1(bert):
    """The tiny stage-1 model, with seeded offsets of std 0.1 on every weight but `temp`: as built, its image and
    text features are nearly identical (ITC = ln 4 to 4 digits, near-uniform ITM logits), so a wrong ITC target
    or a wrong set of negatives would change the losses and gradients only at the 1e-4 level. Not much more than
    0.1 either: with sharper similarities every draw picks the hardest negative whatever the noise, and a rank
    reading the wrong rows of the shared noise would go unseen (at std 0.2 it does, for NEG_SEED)."""
    torch.manual_seed(0)
    model = Blip2Stage1(tiny.our_config(bert, dropout=0.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n != "temp":  # keep the temperature positive and at its initial 0.07
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.train()


def build_stage2(llm_tok):
    """`llm_tok`: the LLM tokenizer's directory, one saved copy shared by the ranks and the reference, as a real
    run shares the LLM's tokenizer directory."""
    torch.manual_seed(0)
    hf, _ = tiny.hf_blip2("opt")  # dropout 0 in its config; the weights do not depend on the byte order
    return blip2_stage2_from_hf(hf, tokenizer=PreTrainedTokenizerFast.from_pretrained(llm_tok)).train()


def build_pformer(bert):
    """A tiny P-Former, offset like build_stage1 so that its sentence features differ (contrastive term)."""
    torch.manual_seed(0)
    model = PFormer(tiny.our_config(bert, dropout=0.0), llm_dim=32)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n != "temp":
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.train()


class ContrastiveTerm(torch.nn.Module):
    """P-Former's loss_c as a forward, as DDP needs (in stage 0 it is part of PFormerStage0.forward)."""

    def __init__(self, pformer):
        super().__init__()
        self.pformer = pformer

    def forward(self, ids, mask):
        return self.pformer.contrastive_loss(self.pformer(ids, mask)[1])


def pformer_step(net, module, captions):
    """P-Former's contrastive term (stage 0's loss_c), forward + backward: (losses, gradients of the encoder and
    text_proj; the prompt head takes no part in this term)."""
    loss = net(*module.tokenize(captions, "cpu"))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    return {"c": loss.detach().clone()}, grads


def trainable(module):
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def recording_negatives():
    """A stand-in for model.sample_negatives that also keeps what it draws (ITM: negative images, then texts)."""
    drawn, sample = [], model_py.sample_negatives

    def record(*args):
        drawn.append(sample(*args))
        return drawn[-1]
    return record, drawn


# rank 0's captions are shorter than rank 1's: each rank pads its own to its longest, the gathered ITM negative texts
# to the longest of all
UNEVEN_CAPTIONS = ["a red square", "a blue circle", "a small green triangle", "the big green triangle above a small red square"]

# samples 0 and 2 show the same image, and sit on different ranks: ITC's soft targets and ITM's masked negatives
# must find each other across the gather
IMAGE_IDS = torch.tensor([5, 6, 5, 8])


def step(net, module, image, captions, stage1, image_ids=None):
    """One forward + backward of `net` (the model or its DDP wrapper around `module`): (losses, gradients)."""
    if stage1:
        out = net(image, captions, image_ids=image_ids, neg_generator=torch.Generator().manual_seed(NEG_SEED))
    else:
        out = net(image, captions)
    out["loss"].backward()
    grads = {}
    for n, p in trainable(module).items():
        assert p.grad is not None, f"{n} got no gradient"
        grads[n] = p.grad.detach().clone()
    return {k: v.detach().clone() for k, v in out.items()}, grads


# ---------------------------------------------------------------- the 2-rank run


def _worker(rank, port, bert, llm_tok, out_path):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    # a rank that fails leaves the other in a collective: time out instead of hanging (spawn also kills it)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        local = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
        results = {}
        record, drawn = recording_negatives()
        model_py.sample_negatives = record  # this process only
        for name, build, captions, ids in (("stage1", lambda: build_stage1(bert), STAGE1_CAPTIONS, None),
                                           ("stage1_same_image", lambda: build_stage1(bert), STAGE1_CAPTIONS,
                                            IMAGE_IDS[local]),
                                           ("stage2", lambda: build_stage2(llm_tok), STAGE2_CAPTIONS, None)):
            module = build()
            net = DistributedDataParallel(module, device_ids=None)
            losses, grads = step(net, module, images()[local], captions[local], name.startswith("stage1"), ids)
            for v in losses.values():  # each rank's loss is its local mean: average over ranks
                dist.all_reduce(v)
                v /= WORLD
            for g in grads.values():  # DDP has already averaged them: every rank must hold the same
                g0 = g.clone()
                dist.broadcast(g0, src=0)
                assert torch.equal(g, g0), "ranks disagree on an all-reduced gradient"
            results[name] = (losses, grads)
        module = build_pformer(bert)
        # the prompt head gets no gradient from loss_c alone
        net = DistributedDataParallel(ContrastiveTerm(module), device_ids=None, find_unused_parameters=True)
        losses, grads = pformer_step(net, module, STAGE1_CAPTIONS[local])
        for v in losses.values():
            dist.all_reduce(v)
            v /= WORLD
        results["pformer"] = (losses, grads)
        # stage 1 with captions of another length on each rank, against text padded to max_txt_len with every pass
        # projecting the image anew (as before the keys-and-values cache)
        module = build_stage1(bert)
        net = DistributedDataParallel(module, device_ids=None)
        uneven = UNEVEN_CAPTIONS[local]
        results["uneven_length"] = module.tokenize(uneven, "cpu")[0].shape[1]
        results["uneven"] = step(net, module, images()[local], uneven, stage1=True)
        module.zero_grad(set_to_none=True)
        with bench.stage1_as_before(module):
            results["uneven_before"] = step(net, module, images()[local], uneven, stage1=True)
        # the longest length of all ranks, exchanged on the host; also through the gloo group an NCCL run makes
        results["max_over_ranks"] = [distributed.max_over_ranks(10 + rank)]
        backend = dist.get_backend
        dist.get_backend = lambda *group: "nccl"
        try:
            results["max_over_ranks"] += [distributed.max_over_ranks(20 - rank), distributed.max_over_ranks(30 + rank)]
            results["host_groups"] = len(distributed._host_group)
        finally:
            dist.get_backend = backend
        drawn = drawn[:2]  # the negatives of the first stage-1 run
        parts = [[torch.empty_like(d) for _ in range(WORLD)] for d in drawn]
        for d, p in zip(drawn, parts):  # this rank's negatives, as indices into the global batch
            dist.all_gather(p, d)
        results["negatives"] = torch.stack([torch.cat(p) for p in parts])  # 2 x B, in global sample order
        if rank == 0:
            torch.save(results, out_path)
        elif rank == 1:
            torch.save({k: results[k] for k in ("uneven", "uneven_before", "uneven_length")}, out_path + ".1")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return tiny.bert_dir(str(tmp_path_factory.mktemp("bert")))


@pytest.fixture(scope="module")
def llm_tok(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("llm_tok"))
    byte_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def ddp_results(bert, llm_tok, tmp_path_factory):
    out_path = str(tmp_path_factory.mktemp("ddp") / "results.pt")
    mp.spawn(_worker, args=(free_port(), bert, llm_tok, out_path), nprocs=WORLD, join=True)
    results = torch.load(out_path, weights_only=True)
    results["rank1"] = torch.load(out_path + ".1", weights_only=True)
    return results


# ---------------------------------------------------------------- comparisons with 1 process, batch B


def assert_same(ddp, ref):
    (ddp_losses, ddp_grads), (ref_losses, ref_grads) = ddp, ref
    assert ddp_losses.keys() == ref_losses.keys()
    for k in ref_losses:
        torch.testing.assert_close(ddp_losses[k], ref_losses[k], rtol=RTOL, atol=ATOL, msg=lambda m: f"{k}: {m}")
    assert ddp_grads.keys() == ref_grads.keys() and ref_grads
    for n in ref_grads:
        torch.testing.assert_close(ddp_grads[n], ref_grads[n], rtol=RTOL, atol=ATOL, msg=lambda m: f"{n}: {m}")


def test_stage1_itc_itm_itg_and_gradients_match_single_process(bert, ddp_results, monkeypatch):
    tok = BertTokenizerFast.from_pretrained(bert)
    counts = {len(tok(c).input_ids) for c in STAGE1_CAPTIONS}
    assert len(counts) == 1 and tok.unk_token_id not in sum(tok(STAGE1_CAPTIONS).input_ids, []), counts
    # record the ITM negatives of the reference: at least one must cross the rank boundary, else the gradient
    # through gather_with_grad (another rank's image embeddings) would go untested
    record, drawn = recording_negatives()
    monkeypatch.setattr(model_py, "sample_negatives", record)
    module = build_stage1(bert)
    ref = step(module, module, images(), STAGE1_CAPTIONS, stage1=True)
    neg_image, neg_text = drawn
    half = torch.arange(B) // (B // WORLD)  # each sample's rank
    assert (half[neg_image] != half).any() and (half[neg_text] != half).any(), (neg_image, neg_text)
    # the draw does not depend on the number of ranks (same generator seed, each rank its rows of the noise)
    assert torch.equal(ddp_results["negatives"], torch.stack(drawn)), (ddp_results["negatives"], drawn)
    assert set(ref[0]) == {"loss", "itc", "itm", "itg"}
    assert_same(ddp_results["stage1"], ref)


def test_stage2_lm_loss_and_gradients_match_single_process(llm_tok, ddp_results):
    tok = PreTrainedTokenizerFast.from_pretrained(llm_tok)
    assert len({len(tok(c + "\n").input_ids) for c in STAGE2_CAPTIONS}) == 1  # BOS + 12 bytes + newline
    module = build_stage2(llm_tok)
    ref = step(module, module, images(), STAGE2_CAPTIONS, stage1=False)
    assert_same(ddp_results["stage2"], ref)


def test_pformer_contrastive_term_matches_single_process(bert, ddp_results):
    module = build_pformer(bert)
    ref = pformer_step(ContrastiveTerm(module), module, STAGE1_CAPTIONS)
    assert "text_proj.weight" in ref[1] and "encoder.layers.0.self_attn.query.weight" in ref[1]
    assert_same(ddp_results["pformer"], ref)


def test_same_image_positives_match_single_process(bert, ddp_results, monkeypatch):
    """With image ids, the same-image rule gives the same losses and gradients on 2 ranks as on 1 process, and no
    sample is drawn as its own image's ITM negative, on its rank or across."""
    record, drawn = recording_negatives()
    monkeypatch.setattr(model_py, "sample_negatives", record)
    module = build_stage1(bert)
    ref = step(module, module, images(), STAGE1_CAPTIONS, stage1=True, image_ids=IMAGE_IDS)
    neg_image, neg_text = drawn
    assert (IMAGE_IDS[neg_image] != IMAGE_IDS).all() and (IMAGE_IDS[neg_text] != IMAGE_IDS).all()
    plain = step(module, module, images(), STAGE1_CAPTIONS, stage1=True)
    assert not torch.allclose(ref[0]["itc"], plain[0]["itc"])  # the rule changes the loss: samples 0 and 2 match
    assert_same(ddp_results["stage1_same_image"], ref)


def test_each_rank_pads_to_its_own_longest_caption_and_reads_each_image_once_with_the_same_losses(bert, ddp_results):
    """On 2 ranks whose captions differ in length, each rank's losses and (all-reduced) gradients equal those of text
    padded to max_txt_len with every pass projecting the image anew (the computation before the keys-and-values
    cache). The common length of ITM's gathered negative texts is the longest of all ranks, exchanged on the host."""
    lengths = ddp_results["uneven_length"], ddp_results["rank1"]["uneven_length"]
    assert lengths[0] < lengths[1] < tiny.our_config(bert).max_txt_len, lengths
    for results in (ddp_results, ddp_results["rank1"]):
        (after, after_grads), (before, before_grads) = results["uneven"], results["uneven_before"]
        assert set(after) == {"loss", "itc", "itm", "itg"}
        for k in after:
            torch.testing.assert_close(after[k], before[k], rtol=0, atol=1e-6, msg=lambda m: f"{k}: {m}")
        assert after_grads.keys() == before_grads.keys()
        for n in after_grads:  # temp's gradient carries 1 / temp^2 times the similarities' rounding (test_model.py)
            torch.testing.assert_close(after_grads[n], before_grads[n], rtol=0, atol=3e-6 if n == "temp" else 1e-6,
                                       msg=lambda m: f"{n}: {m}")
    # the default gloo group, then the gloo group made for a run whose default group is NCCL (made once)
    assert ddp_results["max_over_ranks"] == [11, 20, 31] and ddp_results["host_groups"] == 1
