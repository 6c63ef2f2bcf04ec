"""`abba validate`: the resolved config, the trainable parameters and the ABBA path per layer, without weights."""

from __future__ import annotations

from pathlib import Path

from abba_cli.config import RunConfig, dump_config


def validate_run(cfg: RunConfig, config_path: str | Path, device: str | None = None) -> None:
    """Print the resolved config and the trainable-parameter summary.

    The model is built from its config on the meta device: no weights are read, so validating a 9B config is
    instant and needs no GPU (shapes, target matching and rank limits are all checked the same way). The ABBA
    paths are priced for the device training would use here (as `abba train` prices them), or for `device`.
    """
    from abba_cli.adapters import inject_adapters, trainable_summary
    from abba_cli.data.packing import check_packing
    from abba_cli.data.training_set import check_examples, load_train_examples
    from abba_cli.models.loading import load_configured_base
    from abba_cli.train.execution_plan import describe_execution, fix_auto_paths, training_device_type
    from abba_cli.train.loss import check_loss_impl

    check_packing(cfg)
    check_loss_impl(cfg, training_device_type(device))
    print(f"# resolved config from {config_path}")
    print(dump_config(cfg), end="")
    _, examples, _ = load_train_examples(cfg.data)  # every row read and checked before the model is built
    model, tokenizer = load_configured_base(cfg.model, empty_weights=True)
    if cfg.adapter.type == "full":
        model.requires_grad_(True)
        print(f"# full fine-tuning of every parameter of {cfg.model.name_or_path}")
    else:
        adapted = inject_adapters(model, cfg.adapter, seed=cfg.train.seed, init=False)
        print(f"# {cfg.adapter.type} adapters on {len(adapted)} linear layers of {cfg.model.name_or_path}")
    print(trainable_summary(model))
    if cfg.adapter.type == "lora_pro":
        from abba_cli.train.lora_pro import describe_state

        print(f"# {describe_state(model)}")
    tokens, device_type = cfg.train.micro_batch_size * cfg.data.max_seq_len, training_device_type(device)
    if cfg.train.compile:
        fix_auto_paths(model, tokens, device_type)  # as abba train does
    plan = describe_execution(model, tokens, device_type, fixed=cfg.train.compile)
    if plan:
        print(plan)
    print(check_examples(cfg.data, examples, tokenizer, cfg.model.name_or_path))
    if cfg.data.packing:  # the rows need the tokenized lengths (read from the cache when built before)
        from abba_cli.data.packing import PackedRows
        from abba_cli.data.training_set import prepare_train_dataset

        dataset, _ = prepare_train_dataset(cfg.data, tokenizer, cfg.model.name_or_path)
        print(f"# {PackedRows(dataset, cfg.data.max_seq_len, cfg.train.seed).stats()}")
