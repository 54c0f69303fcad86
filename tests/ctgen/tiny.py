"""Tiny model and training configs for the model tests (seconds on one CPU thread)."""

WINDOW = [-1000, 1000]  # the prep presets' HU window (their `clip`)
TRAIN = {"max_steps": 4, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "ckpt_every": 2, "log_every": 1,
         "tensorboard": False, "seed": 0}
TOKENIZER = {"image_size": 8, "num_slices": 8, "patch_size": 4, "temporal_patch_size": 2, "dim": 32,
             "spatial_depth": 1, "temporal_depth": 1, "heads": 2, "dim_head": 16, "ff_mult": 2.0, "codebook_size": 32,
             "codebook_dim": 16, "adversarial_start": 2, "disc_dim": 8, "disc_layers": 1, "disc_slices": 2}
GENERATOR = {"codebook_size": 32, "dim": 32, "depth": 1, "heads": 2, "dim_head": 16, "ff_mult": 2, "text_dim": 999,
             "max_t": 5, "max_h": 2, "max_w": 2, "cond_drop_prob": 0.5}
SUPERRES = {"in_size": 8, "out_size": 16, "patch_size": 1, "channels": 16, "channel_mult": [1, 2], "layers_per_block": 1,
            "attention_levels": [1], "attention_head_dim": 8, "norm_groups": 4, "text_dim": 999, "cross_attention_dim": 16,
            "sample_steps": 2, "sampler": "ddim"}
TEXT = {"dim": 16, "depth": 1, "heads": 2, "dropout": 0.0, "max_length": 32}
