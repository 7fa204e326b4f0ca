# The paper's best model: ResNet-50 with one textual layer of width 2048 (VOC07 mAP 88.7 in the
# official model zoo). train.py's defaults already are this recipe; this file names the run and
# its data. 8 GPUs: torchrun --standalone --nproc_per_node=8 train.py config/virtex_r50_l1_h2048.py
data_root = 'data/coco'
# python tokenizer.py --captions=data/coco/annotations/captions_train2017.json --vocab_size=10000
# --out=data/coco/coco_10k
tokenizer = 'data/coco/coco_10k.model'
out_dir = 'out/virtex_r50_l1_h2048'
n_layer = 1
n_embd = 2048   # H
n_head = 32     # H / 64
