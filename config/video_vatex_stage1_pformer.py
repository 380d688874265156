# The P-Former paper's video recipe on VATEX captioning, stage 1, as the official video code runs it: pre-extracted I3D
# features (up to 32 segments x 1024, zero-padded, with a mask; no frames decoded) through a Linear(1024 -> 768) into
# the BERT-encoder bridge (bridge="bert": bert-base-uncased over the 32 segment positions, its frozen embedding block
# adding the segments' position embeddings; one output per position), and llm_proj, which starts as BLIP-2's
# pretrained OPT-2.7b projection. Trained with the ALIGNMENT ONLY: 100 * MSE(llm_proj(bridge), P-Former("a photo of " +
# caption)), no ITC / ITM / ITG. 10 epochs of VATEX's 259,910 training captions at batch 128 on one GPU, AdamW betas
# (0.9, 0.999), lr 1e-4 warmed up from 1e-6 over 1000 steps of epoch 0, then one cosine value per epoch down towards
# 1e-5, wd 0.05, fp16 AMP. The official runs also leave the P-Former's dropout on (--pformer_dropout=True). The
# authors' stage 0 was trained on 40M sentences without input masking (train_pformer.py ... --mask_rate=0.0).
# --bridge=qformer puts the Q-Former over the segments instead. Then config/video_vatex_stage2.py.
#   python train_stage1.py config/video_vatex_stage1_pformer.py --pformer_ckpt=out/pformer_opt2.7b_nomask/ckpt.pt
out_dir = "out/video_vatex_stage1_pformer"
train_ann = ["data/vatex/annotations/cap_train.json"]  # LAVIS's format: {"video": "name.mp4", "caption": ...}
train_image_roots = ["data/vatex/features"]  # name.npy per video: S x 1024 I3D segments
val_ann = ["data/vatex/annotations/cap_val.json"]
val_image_roots = ["data/vatex/features"]
video = True
feature_dim = 1024
num_frames = 32  # segments: features are cut or padded to 32, the padding masked
augment = False
bridge = "bert"
pformer_ckpt = "out/pformer_opt2.7b_nomask/ckpt.pt"
llm_proj_init = "Salesforce/blip2-opt-2.7b"  # its language projection, as the official stage 1 starts
stage1_losses = ()  # the official video code trains the alignment alone in stage 1
align_weight = 100.0
align_prefix = "a photo of "  # the target is the P-Former's prompt for "a photo of <caption>"
batch_size = 128
max_steps = 20_300  # 10 epochs: 259,910 / 128 x 10
lr_decay_steps = 20_300
lr_schedule = "epoch"
warmup_steps = 1000
warmup_start_lr = 1e-6
lr = 1e-4
min_lr = 1e-5
weight_decay = 0.05
betas = (0.9, 0.999)
dtype = "float16"
