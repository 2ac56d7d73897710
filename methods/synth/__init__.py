"""Building blocks for synthetic-image generation (data-free quantization).

- ``optimize``: the one pixel-optimisation loop (optimiser, lr schedule, augmentation and loss
  given by the generator), V1's staged warm-up + cosine schedule, ``frozen_params``.
- ``pse``: patch-similarity entropy (head mean, cosine similarities, Gaussian KDE, entropy).
- ``priors``: total variation (Frobenius form, V1's target matching), jitter/flip augmentation,
  clamping to the valid pixel range, scaling of V1's constants to other inputs.
- ``pse_generation``: PSAQ-ViT V1/V2's generator (PSE + CE + target TV, Adam, jitter/flip).
- ``ssim``: global SSIM (full, or its contrast-structure term; all pairs of maps).
- ``attention_ssim``: MimiQ's inter-head similarity loss L_IH on attention logits.
- ``interhead_generation``: MimiQ's generator (L_IH + CE + TV, AdamW, roll/noise/colour augmentation).
- ``batch_augment``: SimCLR-style batch augmentation for MimiQ's fine-tuning.
- ``artifacts``: cache keys, tensor cache, PNG grids.
"""
