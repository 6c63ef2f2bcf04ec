"""The run config's sections: one pydantic model per concern, unknown keys rejected, cross-field checks in
RunConfig."""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

DEFAULT_ABBA_ALPHA = 16.0
# Adapter types whose scale is LoRA's (alpha / r, or alpha / sqrt(r) with use_rslora).
LORA_SCALED = ("lora", "dora", "lora_pro")
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# transformers 5's attention backends ("eager" plus ALL_ATTENTION_FUNCTIONS' keys, less the deprecated paged|
# forms); a test checks each one against the installed transformers.
AttnImplementation = Literal[
    "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention"
]
ATTN_IMPLEMENTATIONS: tuple[str, ...] = get_args(AttnImplementation)
AdapterInit = Literal["default", "pissa", "svd", "random", "svd_second", "svd_minor", "svd_zero_a2", "svd_a2"]


def _expand_home(value: str) -> str:
    # `~/x` means the home directory, as in a shell; without this a literal `./~` folder is created. Only a
    # leading ~ is expanded: a hub id never starts with one.
    return os.path.expanduser(value) if value.startswith("~") else value


PathStr = Annotated[str, AfterValidator(_expand_home)]


class _Strict(BaseModel):
    # allow_inf_nan: nan/inf pass every bound check (or fail one with a misleading message); say "finite".
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Strict):
    name_or_path: PathStr = Field(description="Hub id or local directory of a Hugging Face causal LM.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the frozen base weights ('auto': the checkpoint's own)."
    )
    trust_remote_code: bool = Field(False, description="Allow custom model code from the checkpoint.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    attn_implementation: AttnImplementation | None = Field(
        None, description="Attention backend: " + ", ".join(ATTN_IMPLEMENTATIONS) + " (default: sdpa)."
    )
    quantization: Literal["none", "nf4", "fp4", "int8"] = Field(
        "none",
        description="Load the frozen base quantized with bitsandbytes (4-bit NF4/FP4 or LLM.int8); the adapter "
        "factors stay fp32. Needs the `quant` extra.",
    )
    double_quant: bool = Field(
        False,
        description="nf4/fp4: also quantize the 4-bit blocks' scales (QLoRA's double quantization, ~0.4 bit "
        "per weight less).",
    )

    @model_validator(mode="after")
    def _double_quant_is_4bit(self) -> ModelConfig:
        if self.double_quant and self.quantization not in ("nf4", "fp4"):
            raise ValueError(
                f"model.double_quant applies to 4-bit bases (model.quantization nf4 or fp4), not "
                f"{self.quantization!r}; remove it or set model.quantization: nf4"
            )
        return self


class AdapterConfig(_Strict):
    type: Literal["abba", "lora", "hira", "dora", "lora_pro", "full"] = Field(
        "abba",
        description="Adapter method; 'dora': LoRA with a trained per-row magnitude (DoRA); 'lora_pro': LoRA "
        "whose gradients are adjusted toward the full-weight gradient each step (LoRA-Pro); 'full' trains "
        "every parameter of the base (no adapter).",
    )
    r1: int | None = Field(None, ge=1, description="ABBA rank of B1 A1 (default 16).")
    r2: int | None = Field(None, ge=1, description="ABBA rank of B2 A2 (default 16).")
    r: int | None = Field(None, ge=1, description="LoRA/HiRA/DoRA/LoRA-Pro rank (default 32).")
    ranks: list[Annotated[int, Field(ge=1)]] | None = Field(
        None,
        description="ABBA as a chain of K pairs, dW = s (B1 A1) ⊙ ... ⊙ (BK AK), s = alpha^K / sqrt(prod r_k) "
        "(paper scaling); [a, b] is r1 a, r2 b (give ranks or r1/r2).",
    )
    alpha: float | None = Field(
        None,
        gt=0,
        description="Scale. ABBA paper: s = alpha^2/sqrt(r1 r2) (default alpha 16); "
        "ABBA released: s = alpha; LoRA, DoRA, LoRA-Pro: s = alpha/r (alpha/sqrt(r) with use_rslora), default 2r; "
        "HiRA: s = alpha/r.",
    )
    scaling: Literal["paper", "released"] = Field(
        "paper", description="ABBA scaling convention: paper eq. 7 or the authors' released code."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        min_length=1,
        description="Module-name suffixes of the nn.Linear layers to adapt.",
    )
    init: AdapterInit = Field(
        "default",
        description="'default': the method's own (LoRA: Kaiming A, zero B; ABBA: svd). LoRA: 'pissa'. ABBA "
        "(adapters/abba_init.py): 'svd', 'random', 'svd_second', 'svd_minor', 'svd_zero_a2', 'svd_a2'.",
    )
    use_rslora: bool = Field(
        False, description="LoRA, DoRA, LoRA-Pro: rank-stabilised scaling alpha/sqrt(r)."
    )
    path: Literal["auto", "khatri_rao", "merged", "hybrid"] = Field(
        "auto",
        description="ABBA execution path (all exact): Khatri-Rao factors, merged weight, merged forward with "
        "Khatri-Rao gradients (hybrid), or the cheapest per layer (auto).",
    )

    def abba_ranks(self) -> list[int]:
        """ABBA's pair ranks: adapter.ranks, or [r1, r2]."""
        return list(self.ranks) if self.ranks is not None else [self.r1, self.r2]

    @model_validator(mode="before")
    @classmethod
    def _one_form_of_abba_ranks(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("ranks") is None:
            return data
        given = [k for k in ("r1", "r2") if data.get(k) is not None]
        if given:
            raise ValueError(
                f"adapter.ranks and adapter.{'/'.join(given)} both set ABBA's ranks; give one, not both"
            )
        ranks = data["ranks"]
        if isinstance(ranks, list) and len(ranks) == 2:  # two pairs: the ABBA layer itself
            return {**data, "r1": ranks[0], "r2": ranks[1], "ranks": None}
        return data

    @model_validator(mode="after")
    def _chain_settings(self) -> AdapterConfig:
        if self.ranks is None:
            return self
        problem = (
            f"is a chain of ABBA pairs; {self.type} takes adapter.r"
            if self.type != "abba"
            else f"{self.ranks}: a chain needs at least two pairs (one pair is LoRA: adapter.type lora)"
            if len(self.ranks) < 2
            else "with adapter.path hybrid, a two-pair path; a chain runs khatri_rao, merged or auto"
            if self.path == "hybrid"
            else f"with adapter.init {self.init!r}, defined for two pairs; a chain takes svd or random"
            if self.init not in ("default", "svd", "random")
            else None
        )
        if problem:
            raise ValueError(f"adapter.ranks {problem}")
        return self

    @model_validator(mode="after")
    def _ranks_for_type(self) -> AdapterConfig:
        if self.type == "full":
            given = [k for k in ("r", "r1", "r2", "ranks", "alpha") if getattr(self, k) is not None]
            if given:
                raise ValueError(
                    f"adapter.type 'full' trains every weight and takes no {'/'.join(given)}; remove "
                    f"{', '.join('adapter.' + k for k in given)}"
                )
            if self.init != "default" or self.dropout:
                raise ValueError("adapter.init/adapter.dropout apply to adapters, not to adapter.type 'full'")
            return self
        if self.type == "abba":
            if self.r is not None:
                raise ValueError("adapter.r is the LoRA/HiRA rank; ABBA takes adapter.r1 and adapter.r2")
            if self.r1 is None and self.ranks is None:
                self.r1 = 16
            if self.r2 is None and self.ranks is None:
                self.r2 = 16
            if self.alpha is None:
                # s = 16 at r1 = r2 = 16 (32 at 8 + 8): the low end of the authors' s = 16-64, the best of that
                # range in our sweep (benchmarks/RESULTS.md "ABBA vs LoRA"). alpha 4 (s = 1) learned ~10x slower.
                self.alpha = DEFAULT_ABBA_ALPHA
        else:
            if self.r1 is not None or self.r2 is not None:
                raise ValueError(f"adapter.r1/adapter.r2 are ABBA ranks; {self.type} takes adapter.r")
            if self.r is None:
                self.r = 32
            if self.alpha is None:
                self.alpha = float(2 * self.r) if self.type in LORA_SCALED else float(self.r)
        if self.init == "pissa" and self.type != "lora":
            raise ValueError("adapter.init 'pissa' applies to lora only (ABBA's SVD init is 'svd')")
        if self.init not in ("default", "pissa") and self.type != "abba":
            raise ValueError(f"adapter.init {self.init!r} is ABBA's; {self.type} takes default or pissa")
        return self


class DataConfig(_Strict):
    recipe: PathStr = Field(description="Recipe name (recipes/NAME.yaml) or path to a recipe YAML.")
    path: PathStr | None = Field(
        None, description="Local json/jsonl/parquet file or directory overriding the recipe's source."
    )
    num_samples: int | None = Field(None, ge=1, description="Seeded random subset of this many examples.")
    skip_samples: int = Field(
        0, ge=0, description="Skip this many examples first (keeps eval slices disjoint)."
    )
    max_seq_len: int = Field(512, ge=8, description="Truncate prompt+response to this many tokens.")
    train_on_inputs: bool = Field(False, description="Also compute the loss on prompt tokens.")
    seed: int = Field(42, description="Seed of the subset selection and shuffling.")
    # Data formats and tokenisation.
    drop_long: bool = Field(
        False, description="Drop examples longer than max_seq_len (with a count) instead of cutting them."
    )
    chat_template: str | None = Field(
        None,
        description="data.recipe chat: a Jinja chat template (file path or inline) replacing the tokenizer's.",
    )
    group_by_length: bool = Field(
        False, description="Batch examples of similar length (less padding); seeded, exact on resume."
    )
    cache: bool = Field(
        True, description="Reuse the tokenized dataset from $ABBA_HOME/cache (keyed by content)."
    )
    packing: bool = Field(
        False, description="Pack examples into rows of max_seq_len (micro_batch_size: rows)."
    )
    val_samples: int | None = Field(
        None, ge=1, description="Hold this many examples of the source out of training for val_loss."
    )
    val_path: PathStr | None = Field(
        None, description="Local json/jsonl/parquet file of validation examples (the recipe's fields)."
    )

    @model_validator(mode="after")
    def _one_val_source(self) -> DataConfig:
        if self.val_samples is not None and self.val_path is not None:
            raise ValueError(
                "data.val_samples and data.val_path are two sources of validation data; set only one"
            )
        return self


class TrainConfig(_Strict):
    epochs: float = Field(1.0, gt=0, description="Passes over the data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    micro_batch_size: int = Field(1, ge=1, description="Examples per forward pass per process.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    # Bounded: AdamW's step size is lr / bias correction as a float32 scalar; near 1e37 it overflows with a
    # RuntimeError deep in torch instead of a clear message.
    lr: float = Field(1e-3, gt=0, le=1e30, description="Peak learning rate (AdamW).")
    scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="LR schedule after warmup."
    )
    warmup_ratio: float = Field(0.02, ge=0, lt=1, description="Fraction of steps of linear warmup.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm (null: off).")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="Autocast dtype.")
    seed: int = Field(42, description="Seed of adapter init, dropout and data order.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward.")
    loss_impl: Literal["auto", "full", "chunked", "cce", "liger"] = Field(
        "auto",
        description="Cross-entropy over whole logits or chunks of tokens (same values); auto: if smaller; "
        "cce / liger: cut-cross-entropy's or Liger Kernel's fused kernel (CUDA, installed extras).",
    )
    compile: bool = Field(
        False,
        description="torch.compile each decoder layer in place after the engine wraps the model (one graph "
        "shared by all layers, lengths padded to a multiple of 64; off until a GPU measurement says it pays).",
    )
    compile_backend: Literal["inductor", "aot_eager", "cudagraphs"] = Field(
        "inductor", description="torch.compile backend of train.compile (aot_eager: no kernel generation)."
    )
    save_every: int | None = Field(None, ge=1, description="Checkpoint every N optimizer steps.")
    save_total_limit: int | None = Field(2, ge=1, description="Keep at most this many checkpoints.")
    log_every: int = Field(1, ge=1, description="Write metrics.jsonl every N optimizer steps.")
    eval_every: int | None = Field(
        None, ge=1, description="Validation loss every N optimizer steps and at the end (null: at the end)."
    )
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list, description="Trackers.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after N validations without a lower val_loss (null: train to the end)."
    )
    early_stopping_min_delta: float = Field(0.0, ge=0, description="A smaller val_loss drop does not count.")
    keep_best: bool = Field(False, description="Keep the lowest val_loss's adapter as RUN_DIR/best.")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _no_is_a_string(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `no`/`off` as false; for this key it can only mean "no".
        return "no" if value is False else value


class EvalConfig(_Strict):
    tasks: list[str] = Field(default_factory=list, description="Tasks evaluated by `abba eval` by default.")
    limit: int | None = Field(None, ge=1, description="Evaluate on the first N examples of each task.")
    skip: int = Field(0, ge=0, description="Skip the first N examples of each task (disjoint from training).")
    batch_size: int | None = Field(
        None,
        ge=1,
        description="Prompts per generation batch; unset: chosen for the device (8 on a CPU, on a GPU as many "
        "as the model's KV cache fits, up to 256).",
    )
    max_new_tokens: int | None = Field(None, ge=1, description="Overrides each task's own setting.")


class DistributedConfig(_Strict):
    """How several processes share the model (the process count comes from the launcher: torchrun,
    `accelerate launch`, srun), so one config runs on 1 GPU, 8 GPUs or several nodes."""

    strategy: Literal["ddp", "fsdp", "zero2", "zero3"] = Field(
        "ddp",
        description="ddp: a whole model copy per process (fits one GPU); fsdp: PyTorch FSDP2, parameters, "
        "gradients and optimizer state sharded; zero2: DeepSpeed ZeRO-2, gradients and optimizer state "
        "sharded; zero3: DeepSpeed ZeRO-3, parameters sharded too. Not set: an Accelerate config file "
        "(accelerate launch --config_file) may choose; set, it must agree with one.",
    )
    offload_optimizer: bool = Field(
        False,
        description="Keep optimizer state in CPU memory (zero2, zero3; fsdp offloads it together with "
        "the parameters: set offload_params too).",
    )
    offload_params: bool = Field(False, description="Keep parameter shards in CPU memory (zero3, fsdp).")
    wrap_layers: list[str] | None = Field(
        None,
        description="fsdp: decoder-layer class names each sharded as one unit (transformer-based auto wrap); "
        "null: the model's own _no_split_modules, e.g. [LlamaDecoderLayer].",
    )

    @model_validator(mode="after")
    def _knobs_fit_the_strategy(self) -> DistributedConfig:
        s = self.strategy
        if s == "ddp" and (self.offload_optimizer or self.offload_params or self.wrap_layers):
            raise ValueError(
                "offload_optimizer/offload_params/wrap_layers need strategy fsdp, zero2 or zero3"
            )
        if s == "zero2" and self.offload_params:
            raise ValueError(
                "zero2 keeps whole parameters on every process; offload_params needs zero3 or fsdp"
            )
        if s == "fsdp" and self.offload_optimizer != self.offload_params:
            raise ValueError(
                "FSDP2 offloads parameters, gradients and optimizer state together: set offload_params and "
                "offload_optimizer both true (or both false)"
            )
        if s != "fsdp" and self.wrap_layers:
            raise ValueError(f"wrap_layers is an fsdp setting; strategy is {s}")
        return self


class RunConfig(_Strict):
    model: ModelConfig
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output_dir: PathStr = Field(
        description="Run directory to create (refused if it exists, unless resuming)."
    )

    @model_validator(mode="after")
    def _quantized_base_is_frozen(self) -> RunConfig:
        q = self.model.quantization
        if q != "none" and self.adapter.type in ("full", "hira"):
            why = (
                "trains every base weight, and packed 4/8-bit weights cannot be trained"
                if self.adapter.type == "full"
                else "multiplies the update by W0 itself in every step, which a packed weight does not hold"
            )
            raise ValueError(
                f"model.quantization {q!r} with adapter.type {self.adapter.type!r}: it {why}; "
                "use adapter.type abba or lora, or model.quantization: none"
            )
        if q != "none" and self.adapter.type == "abba" and self.adapter.path in ("merged", "hybrid"):
            raise ValueError(
                f"adapter.path {self.adapter.path!r} builds W0 + dW, which a {q} base (packed weights) does "
                "not allow; use adapter.path khatri_rao or auto (both exact)"
            )
        return self

    @model_validator(mode="after")
    def _lora_pro_needs_whole_factors(self) -> RunConfig:
        if self.adapter.type == "lora_pro" and self.distributed.strategy != "ddp":
            raise ValueError(
                f"adapter.type lora_pro with distributed.strategy {self.distributed.strategy!r}: its step needs "
                "each layer's whole A, B and gradients, which fsdp, zero2 and zero3 split across processes; use "
                "distributed.strategy: ddp"
            )
        return self

    @model_validator(mode="after")
    def _eval_needs_val_data(self) -> RunConfig:
        if self.train.eval_every is not None and self.data.val_samples is None and self.data.val_path is None:
            raise ValueError(
                f"train.eval_every {self.train.eval_every} needs validation data: set data.val_samples "
                "(hold examples out of the training source) or data.val_path (a separate file)"
            )
        t, has_val = self.train, self.data.val_samples is not None or self.data.val_path is not None
        for key, on in (("early_stopping_patience", t.early_stopping_patience), ("keep_best", t.keep_best)):
            if on and not has_val:
                raise ValueError(f"train.{key} follows val_loss: it needs data.val_samples or data.val_path")
        if t.early_stopping_patience is not None and t.eval_every is None:
            raise ValueError("train.early_stopping_patience counts validations: set train.eval_every N too")
        if t.early_stopping_min_delta and t.early_stopping_patience is None:
            raise ValueError("train.early_stopping_min_delta applies with train.early_stopping_patience")
        if t.keep_best and self.adapter.type == "full":
            raise ValueError("train.keep_best keeps the best adapter; adapter.type full trains no adapter")
        return self
