"""
P-Former stage 0: prompt prediction learned from text alone. A BERT encoder reads a sentence (25% of its tokens
masked) and predicts the soft prompt that makes the frozen LLM reproduce the clean sentence; trained with
loss_c (contrastive) + loss_vq (commitment to the LLM's token embeddings) + loss_lm. The frozen P-Former then
guides stages 1 and 2 (their pformer_ckpt=...).

One GPU or CPU:       python train_pformer.py config/pformer_tiny.py
One node, 8 GPUs:     torchrun --standalone --nproc_per_node=8 train_pformer.py config/pformer_opt2.7b_4m.py
"""
import sys

import train_common as tc
from configurator import apply_overrides, config_snapshot
from data import text_loader
from distributed import cleanup_distributed, setup_distributed
from model import Blip2Config, PFormerStage0
from pretrained import init_from_bert

# -----------------------------------------------------------------------------
# default config: the P-Former paper's stage 0 with OPT-2.7b, on the captions of the 4M pairs, batch 8 x 48
# I/O
out_dir = "out/pformer"
init_from = "scratch"  # 'scratch' or 'resume' (continue from out_dir/ckpt.pt)
overwrite = False  # True: a run from scratch may replace the checkpoint of an earlier run in out_dir
resume_changes = False  # True: init_from=resume may change settings that change the run (seed, data, lr, ...)
log_interval = 50
eval_interval = 2000
eval_batches = 50
ckpt_interval = 1000
wandb_log = False
wandb_project = "blip2-pformer"
wandb_run_name = "pformer"
# data: text files (one sentence per line) and caption annotations (JSON / JSONL, read without images), or shards
train_text = ["data/coco/annotations/coco_karpathy_train.json", "data/vg/annotations/vg_caption.json",
              "data/cc3m/annotations/cc3m.json", "data/sbu/annotations/sbu.json"]
train_shards = ""  # e.g. "data/laion/{00000..09999}.tar": their captions only
val_text = ["data/coco/annotations/coco_karpathy_val.json"]
num_workers = 4
# model (the names of model.Blip2Config): a BERT-base encoder, 32 prompt vectors for OPT-2.7b
bert = "bert-base-uncased"
qformer_init_from_bert = True  # the P-Former's encoder starts as BERT
num_query_tokens = 32  # prompt vectors; the same number as the Q-Former's queries in stages 1 and 2
hidden_size = 768
num_layers = 12
num_heads = 12
intermediate_size = 3072
dropout = 0.1
embed_dim = 256
max_txt_len = 32
mask_rate = 0.25
llm_model = "facebook/opt-2.7b"
llm_dtype = "float16"
llm_dropout = False  # True: OPT's own dropout (0.1) on in the LM loss, as the official code leaves it (train mode)
t5_prefix_split = True  # FlanT5 only: split each sentence at a random word into prefix and target
llm_prompt_prefix = ""  # text before the predicted prompt (as stage 2's llm_prompt_prefix)
llm_prompt_suffix = ""  # text after the predicted prompt, before BOS (as stage 2's llm_prompt_suffix)
# optimization
batch_size = 48  # per GPU; x 8 GPUs = 384
grad_accum = 1
max_steps = 52_000  # about 5 epochs of 4M captions at a global batch of 384
lr_decay_steps = 52_000
lr = 1e-4
min_lr = 1e-5
warmup_start_lr = 1e-6
warmup_steps = 2000
weight_decay = 0.05
betas = (0.9, 0.98)
grad_clip = 0.0
# system
device = "cuda"
dtype = "bfloat16"
compile = False
seed = 1337
# -----------------------------------------------------------------------------
apply_overrides(globals(), sys.argv[1:])
config = config_snapshot(globals())
tc.check_config(config)
# -----------------------------------------------------------------------------

dist_info = setup_distributed(device)
tc.seed_everything(seed)  # the same model on every rank

model = PFormerStage0(Blip2Config.pick(config))
if qformer_init_from_bert and init_from == "scratch":
    init_from_bert(model.pformer, bert)
model.to(dist_info.device)
if dist_info.master:
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"P-Former: {n_trainable / 1e6:.1f}M trainable parameters, {num_query_tokens} prompts for {llm_model}")

train_loader = text_loader(train_text, train_shards, batch_size, num_workers, seed)
val_loader = text_loader(val_text, "", batch_size, num_workers, seed, validation=True) if val_text else None


def loss_fn(model, batch):
    return model(batch["text"])


tc.train(model=model, loss_fn=loss_fn, loader=train_loader, val_loader=val_loader, cfg=config, dist_info=dist_info,
         stage=0)
cleanup_distributed()
