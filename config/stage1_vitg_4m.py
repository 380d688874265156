# The P-Former paper's stage 1 (P-Former paper, section 4: 4M pairs): ViT-g (39 of 40 blocks, fp16) + a Q-Former from
# bert-base-uncased, ITC + ITM + ITG on 4M pairs (COCO + VG + CC3M + SBU), 10 epochs at a global batch of 1024.
# torchrun --standalone --nproc_per_node=8 train_stage1.py config/stage1_vitg_4m.py
out_dir = "out/stage1_vitg_4m"
vit_model = "eva_giant_patch14_clip_224"
vit_layers = 39
vit_dtype = "float16"
bert = "bert-base-uncased"
num_query_tokens = 32
batch_size = 128  # x 8 GPUs
grad_accum = 1
max_steps = 40_000  # ~10 epochs: 4M images x 10 / 1024
lr_decay_steps = 40_000
lr = 1e-4
min_lr = 1e-5
warmup_start_lr = 1e-6
warmup_steps = 5000
weight_decay = 0.05
dtype = "float16"  # the paper's fp16 autocast + GradScaler; 'bfloat16' is the safer choice on A100/H100
