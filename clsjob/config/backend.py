"""`backend`: one back end's settings (`hf`, `vllm_pool`, `vllm_prompt`), chosen by `kind`;
the prompt and the vLLM engine of the vLLM back ends."""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, Field, model_validator

from clsjob.config.base import Section


class Example(Section):
    text: str = Field(description="An example input.")
    label: str | list[str] = Field(description="Its label (one of the configured labels); under "
                                               "task: multi_label, a list of them (maybe empty).")


class ShotsConfig(Section):
    """Few-shot examples chosen for each row from a labelled pool, instead of one list for
    every row (KATE: a row's most similar labelled rows help it most)."""
    pool: str = Field(description="Parquet file (local or s3://) of labelled rows to draw "
                                  "shots from; read once on the driver.")
    text_column: str = Field("text", description="The pool's text column.")
    label_column: str = Field("label", description="The pool's label column (configured labels).")
    k: int = Field(8, ge=1, le=64, description="Shots a row gets.")
    select: Literal["fixed", "random", "similar"] = Field(
        "similar", description="similar = the k pool rows nearest the row by cosine similarity "
                               "of `embedder`'s embeddings, the nearest last; random = k drawn "
                               "per row, seeded by the row's id; fixed = the pool's first k rows "
                               "for every row (shared, so vLLM's prefix cache keeps them).")
    embedder: str | None = Field(
        None, description="select: similar: an encoder model folder (local or s3://, e.g. "
                          "all-MiniLM-L6-v2) whose mean-pooled embeddings rank the pool: the "
                          "pool embedded once per job (a Ray task), each row on its actor's CPU.")
    per_label_min: int = Field(
        0, ge=0, description="Shots of every label each row gets at least (a label with fewer "
                             "pool rows: all it has); labels x per_label_min must be <= k.")
    max_shot_tokens: int = Field(128, gt=0, description="A shot's text is cut to this many tokens.")
    seed: int = Field(0, description="select: random: seeds each row's draw with its id.")

    @model_validator(mode="after")
    def _embedder_is_for_similar(self) -> "ShotsConfig":
        if self.select == "similar" and not self.embedder:
            raise ValueError("backend.prompt.shots.select similar needs shots.embedder (an "
                             "encoder model folder)")
        if self.select != "similar" and self.embedder:
            raise ValueError(f"backend.prompt.shots.embedder is for select: similar, not "
                             f"{self.select}")
        return self


class PromptConfig(Section):
    """How `vllm_prompt` asks an LLM. Everything every row shares (system prompt,
    instructions, the label list, examples) comes before the row's text, so that vLLM's
    prefix cache computes it once."""
    mode: Literal["choice", "json", "score"] = Field(
        "choice", description="choice = the answer is forced to be exactly one label; json = "
                              "{label, reasoning} under a JSON schema; score = no sampling, "
                              "the model's probability of every label (fills probs).")
    system_prompt: str | None = Field(None, description="System message (chat models).")
    instructions: str | None = Field(
        None, description="Free-text instructions placed before the label list.")
    examples: list[Example] = Field(default_factory=list, description="Few-shot examples.")
    examples_path: str | None = Field(
        None, description="Parquet file of more few-shot examples (local or s3://).")
    examples_text_column: str = Field("text", description="Text column of examples_path.")
    examples_label_column: str = Field("label", description="Label column of examples_path.")
    max_examples: int = Field(8, ge=0, description="Cap on examples used (inline first).")
    shots: ShotsConfig | None = Field(
        None, description="Few-shot examples chosen per row from a labelled pool (instead of "
                          "examples / examples_path).")
    chat_template: Literal["auto", "on", "off"] = Field(
        "auto", description="auto = the tokenizer's chat template when it has one, else a "
                            "plain completion prompt.")
    reasoning_max_chars: int = Field(
        300, gt=0, description="json mode: longest `reasoning` kept. The reasoning is whole "
                               "sentences within it (one long sentence: its whole words and "
                               "an ellipsis); the answer's token budget grows with it, one "
                               "token a character.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy, the same answer every run.")
    seed: int = Field(0, description="Sampling seed: with temperature > 0, runs still repeat.")
    temperature_scale: float = Field(
        1.0, gt=0, description="score mode: label log-probabilities are divided by it before "
                               "they are renormalised (calibration; `clsjob calibrate` fits it "
                               "on a labelled run). 1 = as the model gives them.")

    @model_validator(mode="after")
    def _one_source_of_examples(self) -> "PromptConfig":
        if self.shots is not None and (self.examples or self.examples_path):
            raise ValueError("backend.prompt.shots chooses each row's examples from its pool; "
                             "leave out backend.prompt.examples and examples_path (put those "
                             "rows in the pool)")
        return self

    @model_validator(mode="after")
    def _scale_needs_scores(self) -> "PromptConfig":
        if self.temperature_scale != 1.0 and self.mode != "score":
            raise ValueError("backend.prompt.temperature_scale applies to mode: score only "
                             "(the other modes give no probabilities)")
        return self


class EngineConfig(Section):
    """vLLM engine settings, passed through. None = vLLM's own default."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto = bfloat16 on GPU, float32 on CPU.")
    max_model_len: int | None = Field(
        None, gt=0, description="Prompt + answer tokens per row. None = the model's maximum. "
                                "vllm_prompt: one that leaves a row no room beside the shared "
                                "prompt and the answer is refused on the driver.")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="GPU memory share for weights and KV cache (GPU only).")
    kv_cache_gib: float | None = Field(
        None, gt=0, description="KV cache size in GiB. None = from gpu_memory_utilization on "
                                "GPU, 1 GiB on CPU (where that share is of one NUMA node).")
    tensor_parallel_size: int = Field(
        1, gt=0, description="GPUs one engine splits each layer over. The actor is given "
                             "tensor_parallel_size x pipeline_parallel_size GPUs, one "
                             "placement-group bundle each, on one node.")
    pipeline_parallel_size: int = Field(
        1, gt=0, description="GPUs one engine splits its layers over, in stages.")
    max_num_seqs: int | None = Field(None, gt=0, description="Sequences per engine step.")
    max_num_batched_tokens: int | None = Field(None, gt=0, description="Tokens per step.")
    enable_prefix_caching: bool = Field(True, description="Reuse the shared prompt prefix.")
    block_size: int | None = Field(
        None, gt=0, description="KV cache block (tokens): the prefix cache reuses whole blocks "
                                "only. None = vLLM's default, except 32 for prompted engines on "
                                "CPU, whose default of 128 caches nothing of a shorter prompt.")
    structured_outputs_backend: Literal["guidance", "xgrammar", "outlines", "auto"] = Field(
        "guidance", description="Constrained decoding library. guidance by default: on labels "
                                "that are prefixes of others, outlines stops at the shortest "
                                "and xgrammar allows non-canonical tokenisations.")
    enforce_eager: bool | None = Field(
        None, description="Skip graph capture/compilation. None = on for CPU (start-up), off "
                          "for GPU (CUDA graphs).")


class BackendSection(Section):
    """Settings every back end has. Each back end is one subclass holding only its own
    settings, told apart by `kind`."""
    model: str = Field(description="Model folder (safetensors + tokenizer); local, or s3:// "
                                    "fetched once per node into storage.model_cache.")
    max_length: int = Field(512, gt=0, description="Tokens of a row's text; longer rows are "
                                                   "truncated and flagged.")
    trust_remote_code: bool = Field(
        False, description="Run model code shipped in the model folder. Off unless you trust it.")

    # What a back end can do: asked by capability, never by kind.
    @property
    def serves_classifier(self) -> bool:
        """A merged classifier folder: a head fine-tuned for a task, with the temperature and
        thresholds its fine-tune fitted (model_folder.py); else a prompted LLM."""
        return True

    @property
    def gives_confidence(self) -> bool:
        """Probabilities for every row it labels (review, abstention, escalation need them)."""
        return True

    @property
    def writes_reasoning(self) -> bool:
        """A `reasoning` column beside each answer."""
        return False

    @property
    def needs_labels(self) -> bool:
        """The config's `labels`: its model has no id2label to take them from."""
        return False

    @property
    def gives_representation(self) -> bool:
        """Each row's representation from the forward that labels it (abstain.score:
        distance)."""
        return False


# hf and vllm_pool: whether the temperature the model folder carries is applied.
CALIBRATED = Field(True, description="Apply the temperature `clsjob finetune` fitted on its eval "
                                     "rows (config.json's clsjob_temperature, written by merge): "
                                     "probs = softmax(logits / T). false = the raw softmax.")


class HFBackendConfig(BackendSection):
    kind: Literal["hf"] = Field(
        "hf", description="hf = merged *ForSequenceClassification folder via transformers; "
                          "vllm_pool = the same folder via vLLM's pooling runner; vllm_prompt "
                          "= a generative LLM, prompted, under constrained decoding.")
    micro_batch_size: int | None = Field(
        None, gt=0, description="Rows per forward pass, length-sorted within each call's rows. "
                                "None = 32 on CPU, 128 on a GPU (the H200 run's best of 32, 128 "
                                "and 256: bench/RESULTS.md, GPU script). A value set always wins.")
    pad_to_multiple_of: int = Field(
        1, gt=0, description="Pad each micro-batch to a token count that is a multiple of this "
                             "(length buckets), so the model sees few distinct shapes: for "
                             "attention kernels planned per shape. 1 = exact lengths: on short "
                             "texts a multiple of 16 adds 17-18 points of padding "
                             "(bench/padding.py), a cost no GPU run has yet shown repaid.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="What the model runs in. auto = bfloat16 where the hardware "
                            "multiplies it natively (GPUs from Ampere on; CPUs with AVX-512 "
                            "BF16 or AMX), float16 on older GPUs, float32 on other CPUs. Each "
                            "part's choice is in the manifest.")
    calibrated: bool = CALIBRATED

    @property
    def gives_representation(self) -> bool:
        return True


class VLLMPoolBackendConfig(BackendSection):
    kind: Literal["vllm_pool"] = "vllm_pool"
    calibrated: bool = CALIBRATED
    engine: EngineConfig = Field(default_factory=EngineConfig,
                                 description="vLLM engine settings.")

    @model_validator(mode="after")
    def _text_fits_the_engine(self) -> "VLLMPoolBackendConfig":
        limit = self.engine.max_model_len
        if limit and self.max_length > limit:
            raise ValueError("backend.max_length must not exceed backend.engine.max_model_len")
        return self


class VLLMPromptBackendConfig(BackendSection):
    kind: Literal["vllm_prompt"] = "vllm_prompt"
    prompt: PromptConfig = Field(default_factory=PromptConfig,
                                 description="How the LLM is asked.")
    engine: EngineConfig = Field(default_factory=EngineConfig,
                                 description="vLLM engine settings.")

    @property
    def serves_classifier(self) -> bool:
        return False

    @property
    def gives_confidence(self) -> bool:
        return self.prompt.mode == "score"

    @property
    def writes_reasoning(self) -> bool:
        return self.prompt.mode == "json"

    @property
    def needs_labels(self) -> bool:
        return True


BACKEND_CONFIGS = (HFBackendConfig, VLLMPoolBackendConfig, VLLMPromptBackendConfig)


def _kind_defaults_to_hf(value: Any) -> Any:
    # `kind` may be left out (the hf back end), yet a discriminated union needs it to choose.
    if isinstance(value, dict) and "kind" not in value:
        return {**value, "kind": "hf"}
    return value


# One back end's settings, chosen by `kind`: a setting of another back end is an unknown key.
BackendConfig = Annotated[Union[BACKEND_CONFIGS], Field(discriminator="kind"),
                          BeforeValidator(_kind_defaults_to_hf)]
