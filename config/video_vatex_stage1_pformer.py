# The P-Former paper's video recipe on VATEX captioning, stage 1: pre-extracted I3D features (up to 32 segments x 1024,
# zero-padded, with a mask; no frames decoded) through a Linear(1024 -> 768) into a Q-Former from bert-base-uncased,
# trained with the ALIGNMENT ONLY: 100 * MSE(llm_proj(queries), P-Former("a photo of " + caption)), no ITC / ITM / ITG.
# 10 epochs of VATEX's 259,910 training captions at batch 128 on one GPU, lr 1e-4 -> 1e-5 cosine after 1000 warmup
# steps from 1e-6, wd 0.05, fp16 AMP. The authors' stage 0 was trained on 40M sentences without input masking
# (train_pformer.py ... --mask_rate=0.0). Then config/video_vatex_stage2.py.
#   python train_stage1.py config/video_vatex_stage1_pformer.py --pformer_ckpt=out/pformer_opt2.7b_nomask/ckpt.pt
out_dir = "out/video_vatex_stage1_pformer"
train_ann = ["data/vatex/annotations/cap_train.json"]  # LAVIS's format: {"video": "name.mp4", "caption": ...}
train_image_roots = ["data/vatex/features"]  # name.npy per video: S x 1024 I3D segments
val_ann = ["data/vatex/annotations/cap_val.json"]
val_image_roots = ["data/vatex/features"]
video = True
feature_dim = 1024
num_frames = 32  # segments: features are cut or zero-padded to 32, the padding masked
augment = False
pformer_ckpt = "out/pformer_opt2.7b_nomask/ckpt.pt"
stage1_losses = ()  # the official video code trains the alignment alone in stage 1
align_weight = 100.0
align_prefix = "a photo of "  # the target is the P-Former's prompt for "a photo of <caption>"
batch_size = 128
max_steps = 20_300  # 10 epochs: 259,910 / 128 x 10
lr_decay_steps = 20_300
warmup_steps = 1000
warmup_start_lr = 1e-6
lr = 1e-4
min_lr = 1e-5
weight_decay = 0.05
dtype = "float16"
