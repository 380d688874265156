"""The CUDA paths, proved on CPU where a CPU can: gradient accumulation under DDP (2 gloo ranks), float32 compute over
half-precision frozen encoders, the frozen LLM computing in its own dtype under a caller's autocast (no re-cast
weights), torch.compile within its recompile limit through a validation pass, frozen weights that DDP leaves
alone, and training steps that never wait for the device (tests/host_sync.py). tests/test_cuda.py runs the rest on
a GPU."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

import tiny
import train_common as tc
from checkpoints import read_checkpoint
from host_sync import HostSyncProbe, mark_host
from model import Blip2Stage1
from train_common import compile_blocks
from pretrained import blip2_stage2_from_hf, init_from_bert
from scripts import read_log, run_script, tiny_data_args, tiny_sizes

# ---------------------------------------------------------------- DDP with gradient accumulation


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_rank(rank, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    run_script("train_stage2.py", *args)


@pytest.mark.slow
def test_ddp_with_gradient_accumulation_equals_one_process(tiny_world, tmp_path):
    """2 gloo ranks x batch 2 x 2 micro-steps = 1 process x batch 4 x 2 micro-steps: the same logged losses and the
    same weights after 2 steps. (DDP's no_sync is a one-use context: entered twice per micro-step it crashed.) The
    captions have equal token counts, since the LM loss is a token mean per rank."""
    with open(f"{tiny_world}/train.json") as f:
        one_object = [dict(a, caption=a["caption"][0]) for a in json.load(f) if len(a["scene"]) == 1]
    ann = tmp_path / "equal_lengths.json"
    ann.write_text(json.dumps(one_object))
    common = ["config/stage2_tiny.py", *tiny_data_args(tiny_world), f"--llm_model={tiny_world}/llm",
              f"--train_ann=['{ann}']", "--val_ann=[]", "--stage1_ckpt=", *tiny_sizes(), "--dropout=0.0", "--max_steps=2",
              "--log_interval=1", "--grad_accum=2", "--augment=True"]
    run_script("train_stage2.py", *common, "--batch_size=4", f"--out_dir={tmp_path / 'one'}")
    mp.spawn(_train_rank, args=(free_port(), [*common, "--batch_size=2", f"--out_dir={tmp_path / 'two'}"]),
             nprocs=2, join=True)
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [r["lm"] for r in two] == pytest.approx([r["lm"] for r in one], rel=1e-5)
    a, b = (read_checkpoint(str(tmp_path / d / "ckpt.pt"))["model"] for d in ("one", "two"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")


# ---------------------------------------------------------------- dtypes of the frozen parts


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return tiny.bert_dir(str(tmp_path_factory.mktemp("bert")))


def images(n=2):
    return torch.randn(n, 3, tiny.IMAGE, tiny.IMAGE, generator=torch.Generator().manual_seed(0))


def test_float32_compute_over_half_precision_frozen_encoders(bert):
    """--dtype=float32 with the default half-precision frozen ViT and LLM: the encoders hand the trainable parts
    float32 (it crashed with 'mat1 and mat2 must have the same dtype')."""
    stage1 = Blip2Stage1(tiny.our_config(bert, vit_dtype="bfloat16")).train()
    out = stage1(images(4), ["a red square", "a blue circle", "a big green triangle", "a small circle"])
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and stage1.ln_vision.weight.grad is not None
    hf, tok = tiny.hf_blip2("opt")
    stage2 = blip2_stage2_from_hf(hf, tokenizer=tok, dtype="bfloat16").train()
    assert stage2.visual.vit.blocks[0].attn.qkv.weight.dtype == stage2.llm.model.dtype == torch.bfloat16
    loss = stage2(images(), ["a red square", "a blue circle"])["loss"]
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and stage2.llm_proj.weight.grad is not None
    assert len(stage2.eval().generate(images(), num_beams=2, max_new_tokens=3)) == 2


def autocast_generation_follows_float32(device, margin=0.15):
    """Greedy captions of 8 images under bf16 autocast equal fp32's token for token, up to each caption's first step
    where fp32's top logit leads the runner-up by less than `margin` (bf16 moves these logits by up to about 0.06):
    past a close call the two may part legitimately. llm_proj is scaled up so that the soft prompt, and with it the
    caption, depends on the image (at random init it barely does: every image got the same caption)."""
    hf, tok = tiny.hf_blip2("opt")
    model = blip2_stage2_from_hf(hf, tokenizer=tok).to(device).eval()
    with torch.no_grad():
        model.llm_proj.weight.mul_(30)
    x = images(8).to(device)

    def greedy(autocast):
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            return model.llm.generate_tokens(model.soft_prompt(x), num_beams=1, max_new_tokens=8, output_scores=True,
                                             return_dict_in_generate=True)
    want, got = greedy(False), greedy(True)
    top2 = torch.stack(want.scores, 1).float().topk(2, dim=-1).values  # B x steps x 2
    decisive = top2[..., 0] - top2[..., 1] >= margin  # B x steps
    sure = torch.where(decisive.all(1), decisive.shape[1], (~decisive).int().argmax(1)).tolist()  # per caption
    captions = model.llm.decode(want.sequences)
    assert len(set(captions)) >= 3, captions  # the image steers the caption
    assert sum(sure) >= 16, sure  # enough tokens are compared for the check to mean something
    for row, n in enumerate(sure):
        assert got.sequences[row, :n].tolist() == want.sequences[row, :n].tolist(), (row, n, captions[row])
    return sure


def test_generation_under_autocast_follows_float32():
    """On CPU with bf16 autocast; tests/test_cuda.py runs the same on the GPU."""
    autocast_generation_follows_float32("cpu")


class CastCounter(TorchDispatchMode):
    """Counts the dtype casts (aten._to_copy) of the given weights (matrices; LayerNorm's vectors are cast to fp32 by
    autocast's rule for layer_norm, as they should be)."""

    def __init__(self, weights):
        super().__init__()
        self.pointers, self.casts = {w.data_ptr() for w in weights}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.pointers:
            self.casts += 1
        return func(*args, **(kwargs or {}))


def test_frozen_llm_is_not_recast_under_another_autocast_dtype():
    """The frozen LLM owns its autocast, as the frozen ViT does: with bf16 weights under the caller's fp16 autocast
    (on CUDA: fp16 OPT under the scripts' bf16), no weight is cast on any call (each cast is a copy of the weights,
    every forward, kept for the backward)."""
    hf, tok = tiny.hf_blip2("opt")
    model = blip2_stage2_from_hf(hf, tokenizer=tok, dtype="bfloat16").train()
    counter = CastCounter([p for p in model.llm.model.parameters() if p.ndim == 2])
    with counter:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(images(), ["a red square", "a blue circle"])["loss"]
        loss.backward()  # outside autocast, as train_common runs it
        with torch.autocast("cpu", dtype=torch.float16):
            model.eval().generate(images(), num_beams=1, max_new_tokens=2)
    assert counter.casts == 0


# ---------------------------------------------------------------- torch.compile


@pytest.mark.slow
def test_compiled_stage1_stays_within_the_recompile_limit_through_validation(bert):
    """compile=True compiles one graph per attention regime, not one per layer: training, a validation pass (eval
    mode) and captions of other lengths stay within torch.compile's recompile limit, so nothing falls back to eager
    (with per-layer graphs, stage 1 passed the limit at its first validation)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = init_from_bert(Blip2Stage1(tiny.our_config(bert, dropout=0.1)), bert)
    compile_blocks(model, backend="eager")  # dynamo's graphs and guards without inductor's code generation
    batches = [["a red square", "two big blue circles"], ["a circle", "the small green triangle above a square"],
               ["a big red square above a small blue circle", "one"]]
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for mode in ("train", "eval", "train"):
            model.train(mode == "train")
            for captions in batches:
                with torch.set_grad_enabled(mode == "train"):
                    out = model(images(), captions)
                if mode == "train":
                    out["loss"].backward()
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert graphs > 0  # the blocks did run compiled: a limit hit would have raised above
    assert torch.isfinite(out["loss"])


# ---------------------------------------------------------------- DDP leaves frozen weights alone


def _frozen_rank(rank, port):
    import torch.distributed as dist

    import train_common as tc
    from distributed import Dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)  # different weights on each rank, frozen and trainable
        net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        net[0].requires_grad_(False)
        net.register_buffer("table", torch.full((3,), float(rank)))
        d = Dist(ddp=True, rank=rank, local_rank=rank, world_size=2, device="cpu", master=rank == 0)
        _, wrapped = tc.prepare_model(net, {"compile": False}, d)
        mine = net[0].weight.detach().clone()
        gathered = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(gathered, mine)
        assert not torch.equal(gathered[0], gathered[1]), "the frozen weight was broadcast"
        assert net.table[0].item() == rank, "the buffer was broadcast"
        trained = [torch.empty_like(net[1].weight) for _ in range(2)]
        dist.all_gather(trained, net[1].weight.detach())
        assert torch.equal(trained[0], trained[1]), "the trainable weight was not synchronised"
        wrapped(torch.randn(2, 4)).sum().backward()  # the all-reduce of the trainable gradients still runs
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_does_not_broadcast_frozen_weights():
    """Every rank builds the same frozen parts from the same files or seed; broadcasting a ViT-g and an OPT-2.7b at
    start-up would move about 7 GB."""
    mp.spawn(_frozen_rank, args=(free_port(),), nprocs=2, join=True)


# ---------------------------------------------------------------- no host synchronisation inside a training step


def watch_training_steps(monkeypatch, probe, grad_scaler):
    """Run train_common's steps (forward and backward, optimizer step, non-finite watch) under `probe`, the data
    loader's work excluded (its batches are host tensors); with fused AdamW, and a live GradScaler if asked, as
    the scripts train on a GPU."""
    make_optimizer, infinite_batches = tc.make_optimizer, tc.infinite_batches

    def watched(f):
        def run(*args, **kwargs):
            with probe:
                return f(*args, **kwargs)
        return run

    def host_batches(*args, **kwargs):
        for epoch, batch in infinite_batches(*args, **kwargs):
            yield epoch, mark_host(batch)

    def paused(batches):
        while True:
            with probe.pause():
                item = next(batches)
            yield item

    monkeypatch.setattr(tc, "make_optimizer", lambda *a, **k: make_optimizer(*a, **{**k, "device": "cuda"}))
    monkeypatch.setattr(tc, "infinite_batches", lambda *a, **k: paused(host_batches(*a, **k)))
    if grad_scaler:
        monkeypatch.setattr(tc, "make_grad_scaler", lambda *a: torch.amp.GradScaler("cpu"))
    for name in ("forward_backward", "optimizer_step"):
        monkeypatch.setattr(tc, name, watched(getattr(tc, name)))
    monkeypatch.setattr(tc.NonFiniteWatch, "record", watched(tc.NonFiniteWatch.record))


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_no_host_sync_inside_a_training_step(tiny_world, tmp_path, monkeypatch, stage):
    """tests/test_cuda.py's set_sync_debug_mode("error") check, by CPU proxy on the train scripts themselves: their
    loss functions, the tokenizers' ids and stage 1's image ids moved without blocking, the frozen LLM given masks
    that transformers need not read, fused AdamW, and for stage 2 the GradScaler of fp16."""
    w = tiny_world
    probe = HostSyncProbe()
    watch_training_steps(monkeypatch, probe, grad_scaler=stage == 2)
    common = [f"--out_dir={tmp_path}", "--max_steps=2", "--log_interval=1", "--ckpt_interval=100"]
    if stage == 0:
        run_script("train_pformer.py", "config/pformer_tiny.py", f"--train_text=['{w}/train.json']",
                   "--val_text=[]", f"--bert={w}/bert", f"--llm_model={w}/llm", *common)
    else:
        extra = [f"--bert={w}/bert"] if stage == 1 else [f"--llm_model={w}/llm", "--stage1_ckpt=", *tiny_sizes()]
        run_script(f"train_stage{stage}.py", f"config/stage{stage}_tiny.py", *tiny_data_args(w), "--val_ann=[]",
                   *extra, *common)
    assert len(read_log(tmp_path)) == 2
    assert probe.syncs == []


def test_the_host_sync_probe_sees_what_a_gpu_waits_for():
    """The probe behind the test above: blocking copies of host tensors, reads of device tensors and sizes that
    depend on a device tensor's values are caught, their host-side twins are not; and transformers given the 2-D
    padding mask reads it on the host, hence the 4-D masks of backbones.FrozenLLM.lm_loss."""
    hf, tok = tiny.hf_blip2("opt")
    llm = blip2_stage2_from_hf(hf, tokenizer=tok).llm
    ids = mark_host(torch.tensor([[5, 6, 7], [5, 6, 1]]))
    with HostSyncProbe() as probe:
        on_device = ids.to("cpu", non_blocking=True)
        ids.to(torch.float32).sum().item(), ids[ids > 5], bool(ids.any())  # host tensors: no wait
        assert probe.syncs == []
        ids.to(on_device.device)
        on_device.sum().item()
        on_device[on_device > 5]
        torch.tensor([1, 2], device=on_device.device)
    assert [s.split(" at ")[0] for s in probe.syncs] == [
        "blocking copy to the device (to)", "a device tensor read as a Python number (.item(), bool(), int())",
        "index with a boolean device mask (its size is read on the host)", "blocking copy to the device (tensor)"]
    with torch.no_grad(), HostSyncProbe() as probe:
        embeds = llm.embed(on_device)
        llm.model(inputs_embeds=embeds, attention_mask=(on_device != 1).long(), use_cache=False)
    assert probe.syncs and all("masking_utils.py" in s for s in probe.syncs)
