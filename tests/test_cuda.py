"""The CUDA paths on a real GPU (skipped without one): the tiny train scripts in bf16 and in fp16 with the GradScaler
(finite losses, exact resume), torchrun with NCCL (checkpoint, validation all-reduce), no host synchronisation inside
a training step, flash or memory-efficient attention for every pass (never the math kernel), an MFU peak for the GPU
in use, and generation under autocast following fp32. dev/gpu_check.sh runs this file after the benchmark; the CPU
proxies of these checks are in tests/test_precision.py."""

import os
import subprocess
import sys

import pytest
import torch

import tiny
import train_common as tc
from checkpoints import read_checkpoint
from pretrained import blip2_stage2_from_hf
from scripts import ROOT, read_log, tiny_data_args, train_tiny
from test_precision import autocast_generation_follows_float32

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
CUDA = ["--device=cuda", "--vit_dtype=float16", "--log_interval=1", "--eval_interval=3", "--ckpt_interval=100"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("stage", [1, 2])
def test_tiny_training_on_cuda_resumes_exactly(tiny_world, tmp_path, dtype, stage):
    common = [*CUDA, f"--dtype={dtype}", "--lr_decay_steps=6", "--warmup_steps=2", "--dropout=0.1",
              "--num_workers=2"]
    if stage == 2:
        common += ["--stage1_ckpt=", "--llm_dtype=float16"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train_tiny(stage, tiny_world, full, "--max_steps=6", *common)
    train_tiny(stage, tiny_world, part, "--max_steps=3", *common)
    train_tiny(stage, tiny_world, part, "--max_steps=6", "--init_from=resume", *common)
    rows = [r for r in read_log(full) if "loss" in r]
    assert len(rows) == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert any("val_loss" in r for r in read_log(full))
    a, b = (read_checkpoint(os.path.join(d, "ckpt.pt"))["model"] for d in (full, part))
    for k in a:  # GPU kernels may sum in another order between runs: close, not bit-equal
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=lambda m: f"{k}: {m}")


def test_torchrun_with_nccl(tiny_world, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train_stage1.py",
           "config/stage1_tiny.py", *tiny_data_args(tiny_world), f"--bert={tiny_world}/bert", f"--out_dir={out}",
           "--max_steps=4", *CUDA]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,  # a hang must not eat the GPU's time
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert any("val_loss" in r for r in read_log(out)) and read_checkpoint(str(out / "ckpt.pt"))["step"] == 4


def tiny_stage2():
    hf, tok = tiny.hf_blip2("opt")
    return blip2_stage2_from_hf(hf, tokenizer=tok, dtype="float16").cuda()


def images(n=4):
    return torch.randn(n, 3, tiny.IMAGE, tiny.IMAGE, generator=torch.Generator().manual_seed(0)).cuda()


CAPTIONS = ["a red square", "two blue stars", "the big circle", "a small green triangle"]


def test_no_host_sync_inside_a_training_step():
    """Between log steps, a training step never waits for the GPU: no .item(), no blocking copy (fp16 with fused
    AdamW: the GradScaler's inf check stays on the device too; the frozen LLM gets 4-D masks, which transformers
    does not read). test_precision.py proves the same on CPU, on the train scripts themselves."""
    model = tiny_stage2().train()
    optimizer = tc.make_optimizer(model, lr=1e-4, weight_decay=0.05, betas=(0.9, 0.98), device="cuda")
    scaler = tc.make_grad_scaler("cuda", "float16")
    cfg = {"grad_clip": 1.0}
    watch = tc.NonFiniteWatch("cuda", check_grads=False)
    x = images()
    for i in range(3):
        if i == 2:
            torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", dtype=torch.float16):
                loss = model(x, CAPTIONS)["loss"]
            scaler.scale(loss).backward()
            watch.record(i, loss, tc.optimizer_step(optimizer, scaler, [p for p in model.parameters()
                                                                         if p.requires_grad], cfg))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)
    # the check above is live: in "error" mode, reading a GPU value on the host does fail
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            loss.item()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_fused_attention_for_every_pass(tiny_world):
    """Flash or memory-efficient attention only: the math kernel (a full L x L matrix) is never needed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from model import Blip2Stage1
    from pretrained import init_from_bert

    bert = f"{tiny_world}/bert"
    config = tiny.our_config(bert, dropout=0.1, max_position_embeddings=512)  # the tiny world's BERT has 512
    stage1 = init_from_bert(Blip2Stage1(config), bert).cuda().train()
    stage2 = tiny_stage2().train()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = stage1(images(), CAPTIONS)["loss"] + stage2(images(), CAPTIONS)["loss"]
        loss.backward()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            captions = stage2.eval().generate(images(), num_beams=2, max_new_tokens=4)
    assert torch.isfinite(loss) and stage1.ln_vision.weight.grad is not None
    assert len(captions) == 4 and all(isinstance(c, str) for c in captions)


def test_mfu_knows_this_gpu():
    assert tc.peak_flops("cuda:0") is not None, torch.cuda.get_device_name(0)


def test_generation_under_autocast_follows_float32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the train scripts turn TF32 on; the reference is full fp32
    try:
        autocast_generation_follows_float32("cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
