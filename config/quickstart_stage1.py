# Stage 1 of the quick start (quickstart.py) on the world of `python world.py --quickstart`, on 2 CPU cores in
# about a minute: the ViT and the LLM were pretrained on the world's images and text, as EVA ViT-g and a real LLM were.
out_dir = "out/quickstart/stage1"
train_ann = ["data/quickstart/train.json"]
train_image_roots = ["data/quickstart/images"]
val_ann = ["data/quickstart/test_captions.json"]
val_image_roots = ["data/quickstart/images"]
num_workers = 0
augment = False  # the captions name rows top to bottom: a random crop could cut an object out
cache_vit_features = True  # so the frozen ViT runs once per image: the same weights, bit for bit, sooner
vit_pretrained = "data/quickstart/vit.pth"
vit_kwargs = dict(patch_size=8, embed_dim=96, depth=4, num_heads=4, mlp_ratio=2.0)
vit_layers = 3  # the second-to-last block, as BLIP-2 reads EVA ViT-g
vit_dtype = "float32"
image_size = 48
bert = "data/quickstart/bert"
num_query_tokens = 16
cross_attention_freq = 2
hidden_size = 128
num_layers = 4
num_heads = 4
intermediate_size = 256
dropout = 0.0
embed_dim = 64
max_txt_len = 32
batch_size = 32
max_steps = 300
lr_decay_steps = 300
warmup_steps = 20
lr = 1e-3
min_lr = 1e-4
log_interval = 20
eval_interval = 200
eval_batches = 2
ckpt_interval = 100
device = "cpu"
dtype = "float32"
