"""The options of launch.tiny_run_args as the flat mapping `config.build_config` takes (in-process tests)."""


def tiny_options(base, data, out, **overrides):
    """The flat options of launch.tiny_run_args, as build_config takes them."""
    options = {"pretrained_model_name_or_path": str(base), "train_data_dir": str(data), "output_dir": str(out),
               "max_train_steps": 2, "train_batch_size": 4, "learning_rate": 1e-3, "structure_warmup_steps": 0,
               "disc_width": 8, "disc_depth": 2, "disc_embed_dim": 16, "report_to": "none"}
    options.update(overrides)
    return options
