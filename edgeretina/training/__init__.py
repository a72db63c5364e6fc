"""Training: torch + open_clip (and timm). Import the submodules you need; nothing heavy is imported here.

Where each concern lives:
- the tower: backbone (the vision tower module and its config), towers (one adapter per tower kind:
  open_clip ViT, open_clip ModifiedResNet, open_clip TimmModel, timm models by name), factory (building
  towers from open_clip names, ``timm/<name>``, presets), weights (strict loading of local weight files),
  hub_weights (offline checks for hub tags), prompts (the grade and lesion descriptions, prompts.json);
- the grader: model (projection, text prototypes, CORAL, saliency, lesion head), losses (CORAL, focal,
  saliency MIL, lesion Dice);
- the data: data (prepared images, samplers), augment (field-preserving augmentation); the dataset
  layouts themselves are torch-free, in edgeretina/layouts;
- the run: loop (training and prediction), freezing (frozen / last-N-blocks backbones), feature_cache
  (heads trained from cached backbone outputs), distributed (DDP under torchrun), resume (resumable
  epochs), precision (fp32/bf16/fp16 by hardware);
- after training: calibration (ordinal thresholds, temperatures, the referable operating point),
  checkpoint (the self-describing file), checkpoint_tools (recalibration and bank rebuilds without
  retraining), captions + contrastive (the optional image-text pre-training stage, TWLR), prune (channel pruning, 2:4 sparsity and distillation: torch surgery the export step calls).
"""
