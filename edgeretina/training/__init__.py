"""Training: torch + open_clip. Import the submodules you need; nothing heavy is imported here.

Where each concern lives: backbone (the vision tower module and its config), towers (one adapter per
tower kind: open_clip ViT, open_clip ModifiedResNet, timm), factory (building towers from open_clip
names, presets and local weights), model (the grader: projection, text prototypes, CORAL, saliency,
lesion head), losses, data (datasets, batches, augmentation), loop (training and prediction),
precision (fp32/bf16/fp16 by hardware), calibration (ordinal thresholds and temperature), checkpoint
(the self-describing file), prune (channel pruning, 2:4 sparsity and distillation: torch surgery the
export step calls).
"""
