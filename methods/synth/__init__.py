"""Building blocks for synthetic-image generation (data-free quantization).

- ``pse``: patch-similarity entropy (head mean, cosine similarities, Gaussian KDE, entropy).
- ``priors``: total variation (V1 target-matching form and DeepInversion form), jitter/flip
  augmentation, clamping to the valid pixel range, scaling of V1's constants to other inputs.
- ``optimize``: Adam pixel-optimisation loop over stages with warm-up + cosine schedules.
- ``pse_generation``: the PSAQ-ViT loss (PSE + CE + target TV) on top of the three above.
- ``artifacts``: cache keys, tensor cache, PNG grids.
"""
