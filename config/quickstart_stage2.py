# Stage 2 of the quick start (quickstart.py), after config/quickstart_stage1.py: the frozen LLM pretrained
# on the world's text (captions, and questions answered in eval.py's VQA template) reads the soft prompt. The image
# encoder and Q-Former sizes are stage 1's, from its checkpoint.
out_dir = "out/quickstart/stage2"
stage1_ckpt = "out/quickstart/stage1/ckpt.pt"
llm_model = "data/quickstart/llm"
llm_dtype = "float32"
# the world's LLM read only pages of documents "</s> sentence \n": the soft prompt stands for a document (the
# caption), begins and ends as they do, in training and generation alike (without the "</s>" the LLM took a soft
# prompt for the middle of a caption and wrote on after the question)
llm_prompt_prefix = "</s>"
llm_prompt_suffix = "\n"
train_ann = ["data/quickstart/train.json"]
train_image_roots = ["data/quickstart/images"]
val_ann = ["data/quickstart/test_captions.json"]
val_image_roots = ["data/quickstart/images"]
num_workers = 0
augment = False  # the captions name rows top to bottom: a random crop could cut an object out
cache_vit_features = True  # so the frozen ViT runs once per image: the same weights, bit for bit, sooner
vit_dtype = "float32"
dropout = 0.0
max_txt_len = 32
batch_size = 32
max_steps = 1800
lr_decay_steps = 1800
warmup_steps = 20
lr = 1e-3
min_lr = 1e-4
log_interval = 20
eval_interval = 200
eval_batches = 2
ckpt_interval = 100
device = "cpu"
dtype = "float32"
