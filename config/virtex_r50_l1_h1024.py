# The paper's base model: ResNet-50 with one textual layer of width 1024 (the upstream
# _base_bicaptioning_R_50_L1_H1024 config). Same recipe as train.py's defaults, narrower head.
data_root = 'data/coco'
tokenizer = 'data/coco/coco_10k.model'
out_dir = 'out/virtex_r50_l1_h1024'
n_layer = 1
n_embd = 1024   # H
n_head = 16     # H / 64
