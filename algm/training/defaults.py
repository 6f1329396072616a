"""Default hyper-parameters of head training (:class:`algm.training.head.TrainConfig`) and
fine-tuning (:class:`algm.training.finetune.FinetuneConfig`), as plain values: those configs
take their field defaults from here, and so do the ``train-head`` and ``finetune``
parsers, which therefore answer ``--help`` without importing torch."""

from __future__ import annotations

# fp32, bf16 autocast of the forward, or auto: bf16 where the hardware computes it natively
TRAIN_PRECISIONS = ("auto", "fp32", "bf16")

# Head training. Measured on a 2-core CPU with AMX (ViT-S/14, CamVid train, 367 windows of
# 336x448): mask head 6 epochs x 92 steps once the features are cached (about 2 min),
# about 40 s per epoch in bf16 (4 min in all; fp32: 72 s per epoch), 52.2 mIoU on
# CamVid val (fp32: 52.1; linear probe reference: 41.6); linear head 4 epochs: 47.4
# (cached-feature estimate).
HEAD_EPOCHS = 6
HEAD_LR = {"mask": 4e-4, "linear": 3e-3}  # AdamW peak, per decoder
HEAD_WEIGHT_DECAY = 0.01
HEAD_BATCH_SIZE = 4
HEAD_SCHEDULE = "cosine"
HEAD_WARMUP = 0.05
HEAD_SEED = 0
HEAD_SCALE_LR_MULT = 10.0
HEAD_PRECISION = "auto"

# Fine-tuning.
FINETUNE_EPOCHS = 2
FINETUNE_FREEZE_BLOCKS = 0
FINETUNE_VIEWS = 2
FINETUNE_BATCH_SIZE = 8
FINETUNE_LR = 1e-3
FINETUNE_MIN_LR = 1e-5
FINETUNE_SEED = 0
FINETUNE_PRECISION = "auto"
