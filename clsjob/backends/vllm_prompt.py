"""`vllm_prompt` back end: a generative LLM, prompted, whose answer is forced into the label set.

Three modes (`backend.prompt.mode`):
- choice: structured outputs with `choice=labels`; the answer is exactly one label.
- json:   a JSON schema {label: one of the labels, reasoning: whole sentences ≤ N chars}.
- score:  no sampling: the model's probability of every label. When the labels' first tokens
          differ, one forward step per row gives them all (`logprob_token_ids`), renormalised
          over the labels; otherwise each label's whole token sequence (+ end of turn) is
          scored, one step per node of the labels' token trie, the row's prompt read from the
          prefix cache.
A multi-label task: json = {labels: a list of distinct labels, reasoning}; score = each label's
own yes/no probability, one request per row and label sharing the row's cached prompt.
Rows whose prompt would not fit `max_model_len` are cut to fit and flagged; a row vLLM still
refuses gets `error` and the chunk goes on. A context too short for the shared prompt and the
answer is refused on the driver, before any engine starts (check_context_length).
The engine is shared by the actor's calls (vllm_engine.EngineFeed): the next chunk's rows join
the engine's batch while the last one's answers finish, and are tokenised beside it.
"""
from __future__ import annotations

import copy
import json
import logging
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from clsjob import model_cache, store
from clsjob.backends import CheckedModel, ModelError, check_model_files, local_backend
from clsjob.backends import vllm_engine
from clsjob.backends.rows import attach_results, rows_to_classify, stamp
from clsjob.backends.vllm_engine import EngineFeed, engine_args, engine_dtype, prepare_env
from clsjob.config import Example, PromptConfig, StorageConfig, VLLMPromptBackendConfig
from clsjob.contract import id_column
from clsjob.evaluation import multilabel
from clsjob.labels import LabelError, LabelSet
from clsjob.prompts import (PromptTokens, asks_each_label, encode_rows, fit_reasoning,
                            load_json_answer, pick_examples, reasoning_schema, render_template,
                            shot_pieces, tokenize_template)
from clsjob.shots import Pool, choose_shots, fixed_shots
from clsjob.task import MULTI_LABEL, SINGLE_LABEL, Task

log = logging.getLogger("clsjob")

# The structured-outputs back ends that hold the reasoning's pattern and its length together
# (auto sends such a schema to guidance: xgrammar refuses it); see prompts.reasoning_schema.
LENGTH_WITH_PATTERN = ("guidance", "auto")
# Files of a model folder that hold weights: the driver never fetches these.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx")
# An s3:// folder's other files (tokenizer, config) up to this size are fetched to the driver
# to check the prompt fits; a folder with more is left to the actor's check.
DRIVER_FETCH_BYTES = 256 * 2**20


def check_prompted_model(backend: VLLMPromptBackendConfig, labels: LabelSet,
                         storage: StorageConfig, task: Task = SINGLE_LABEL) -> CheckedModel:
    config = check_model_files(backend, storage)
    architectures = config.get("architectures") or []
    if not any(a.endswith(("ForCausalLM", "ForConditionalGeneration")) for a in architectures):
        raise ModelError(f"backend.model: {backend.model} is {architectures}, not a generative "
                         f"(*ForCausalLM) model; a merged classifier runs under hf or vllm_pool")
    examples, pool = prompt_examples(backend.prompt, labels, storage)  # their labels, before any row
    # backends.check_model calls this without the task, so as single-label, whose prompt and
    # answer are never longer than a multi-label run's: one is refused here only when it
    # cannot fit, and the actor makes its exact sum.
    check_context_length(backend, labels, examples, config, storage, task, pool)
    # score mode's label log-probabilities are divided by temperature_scale; the others give
    # no probabilities.
    scale = backend.prompt.temperature_scale if backend.prompt.mode == "score" else None
    # The pool's rows decide the prompts: another pool is another run's work.
    inputs = (("backend.prompt.shots.pool", pool.fingerprint()),) if pool else ()
    return CheckedModel(labels, scale, config, inputs=inputs)


def check_context_length(backend: VLLMPromptBackendConfig, labels: LabelSet,
                         examples: list[Example], config: dict, storage: StorageConfig,
                         task: Task = SINGLE_LABEL, pool: Pool | None = None) -> None:
    """Refuse, before any engine starts, a context that leaves a row no room: the shared
    prompt rendered and tokenised as the actor will, plus the answer's token budget, against
    backend.engine.max_model_len (or the model's own context). The actor makes the same sum
    (row_budget) with the engine's final word on the context."""
    limit = vllm_engine.check_max_model_len(backend, config)
    tokenizer = driver_tokenizer(backend, storage) if limit else None
    if tokenizer is None:
        return
    prompt = backend.prompt
    template = shared_prompt(tokenizer, labels, prompt, examples, task,
                             pool_pieces(tokenizer, prompt, pool))
    answer_tokens = mode_class(prompt, task).tokens_needed(labels, prompt, tokenizer)
    row_budget(backend, limit, template, answer_tokens)


def driver_tokenizer(backend: VLLMPromptBackendConfig, storage: StorageConfig):
    """The model's tokenizer, on the driver, without its weights: read in place from a local
    folder; from an s3:// folder, its files other than weights fetched to a temporary folder
    (None when they are over DRIVER_FETCH_BYTES)."""
    from transformers import AutoTokenizer

    def load(folder: str):
        try:
            return AutoTokenizer.from_pretrained(folder, trust_remote_code=backend.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ModelError(f"backend.model: {backend.model}: cannot load its tokenizer: "
                             f"{exc}") from None

    if not model_cache.is_remote(backend.model):
        return load(backend.model)
    files = [f for f in store.list_folder(backend.model, storage)
             if not f.name.endswith(WEIGHT_SUFFIXES)]
    if sum(f.size for f in files) > DRIVER_FETCH_BYTES:
        return None
    with tempfile.TemporaryDirectory(prefix="clsjob-tokenizer-") as folder:
        store.fetch_files(backend.model, files, folder, storage)
        return load(folder)


def shared_prompt(tokenizer, labels: LabelSet, prompt: PromptConfig, examples: list[Example],
                  task: Task = SINGLE_LABEL, pieces: list[list[int]] | None = None) -> PromptTokens:
    """The tokens around every row's text: the chat template's form when the tokenizer has
    one (prompt.chat_template: auto), else the plain one. The driver (check_context_length)
    and the actor build it alike. With each pool row's shot `pieces` (shots per row), room
    for the k longest is kept in every prompt."""
    chat = prompt.chat_template == "on" or (
        prompt.chat_template == "auto" and getattr(tokenizer, "chat_template", None))
    apply_chat = (lambda m: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                  ) if chat else None
    template = tokenize_template(
        tokenizer, *render_template(labels, prompt, examples, apply_chat, task, pieces is not None),
        chat=bool(chat), labels=labels if asks_each_label(prompt, task) else None)
    if pieces is None:
        return template
    return template.with_shot_room(sum(sorted(map(len, pieces))[-prompt.shots.k:]))


def pool_pieces(tokenizer, prompt: PromptConfig, pool: Pool | None) -> list[list[int]] | None:
    """Each pool row's shot as tokens (prompts.shot_pieces), where rows choose their own
    shots; None where they share them (no pool, or select: fixed)."""
    if pool is None or prompt.shots.select == "fixed":
        return None
    return shot_pieces(tokenizer, list(pool.texts), list(pool.labels), prompt,
                       prompt.shots.max_shot_tokens)


def row_budget(backend: VLLMPromptBackendConfig, limit: int, template: PromptTokens,
               answer_tokens: int) -> int:
    """Tokens of a row's text that fit beside the shared prompt and the answer in a context
    of `limit` tokens (at most backend.max_length); a ModelError naming the setting and the
    smallest that works when none do."""
    room = limit - template.overhead - answer_tokens
    if room >= 1:
        return min(backend.max_length, room)
    need = template.overhead + answer_tokens + 1
    configured = backend.engine.max_model_len is not None
    where = (f"backend.engine.max_model_len {limit}" if configured else
             f"the model's context of {limit} tokens (backend.engine.max_model_len is unset)")
    advice = (f"set backend.engine.max_model_len to at least {need} "
              f"({need - 1 + backend.max_length} keeps rows of backend.max_length "
              f"{backend.max_length} tokens whole)" if configured else
              f"it needs at least {need}: shorten the shared prompt (instructions, examples, "
              f"labels) or backend.prompt.reasoning_max_chars")
    raise ModelError(f"{where} leaves no room for the row text: the shared prompt takes "
                     f"{template.overhead} tokens and the answer up to {answer_tokens}; {advice}")


def actor_examples(backend: VLLMPromptBackendConfig, labels: LabelSet, cfg) -> dict:
    """The few-shot examples (and the pool rows choose theirs from), read once on the driver
    and handed to every actor; the column a random draw is seeded by (cfg: ClassifyConfig)."""
    examples, pool = prompt_examples(backend.prompt, labels, cfg.storage)
    per_row = pool is not None and backend.prompt.shots.select != "fixed"
    kwargs = {"examples": examples, "pool": pool if per_row else None, "id_column": id_column(cfg.input)}
    if per_row and backend.prompt.shots.select == "similar":
        kwargs["pool_vectors"] = pool_vectors_once(backend.prompt.shots, pool, cfg.storage)
    return kwargs


def pool_vectors_once(shots, pool: Pool, storage: StorageConfig):
    """The pool's vectors, embedded once for the job by a Ray task and fetched by every actor
    from the object store (an ObjectRef; the task runs while the actors' engines load).
    Measured (bench/shots_pool.py, 10,003 rows, 2 cores): embedding costs an actor 15 s with
    all-MiniLM-L6-v2 and ~2 min with all-mpnet-base-v2; fetching the vectors, under 10 ms —
    and an actor restarted, or added by autoscaling, fetches them again instead of redoing
    them. One CPU asked for: the slot kept beside the actors for reading and writing, so the
    task never waits on the actors that wait on it."""
    import ray

    from clsjob.embedder import embed_pool

    return ray.remote(num_cpus=1)(embed_pool).remote(shots.embedder, list(pool.texts), storage)


def prompt_examples(prompt: PromptConfig, labels: LabelSet,
                    storage: StorageConfig) -> tuple[list[Example], Pool | None]:
    """(the examples every row shares, the pool of backend.prompt.shots or None). With
    select: fixed the pool's first k rows are the shared examples."""
    if prompt.shots is None:
        return load_examples(prompt, labels, storage), None
    shots = prompt.shots
    pool = load_pool(prompt, labels, storage)
    if shots.select != "fixed":
        return [], pool
    return [Example(text=pool.texts[j], label=pool.labels[j])
            for j in fixed_shots(pool, shots.k, shots.per_label_min)], pool


def load_pool(prompt: PromptConfig, labels: LabelSet, storage: StorageConfig) -> Pool:
    """backend.prompt.shots.pool read and checked: every row has a text and one of the
    configured labels, and per_label_min fits in k."""
    shots, key = prompt.shots, "backend.prompt.shots"
    if shots.per_label_min * len(labels) > shots.k:
        raise LabelError(f"{key}.per_label_min {shots.per_label_min} x {len(labels)} labels "
                         f"is more than {key}.k {shots.k}")
    cols = [shots.text_column, shots.label_column]
    try:
        table = store.read_table(shots.pool, storage, columns=cols)
    except (OSError, pa.ArrowInvalid, KeyError) as exc:
        raise ModelError(f"{key}.pool: cannot read {cols} from {shots.pool}: {exc}") from None
    texts, gold = (table.column(c).to_pylist() for c in cols)
    if not texts:
        raise ModelError(f"{key}.pool: {shots.pool} has no rows")
    for i, (text, label) in enumerate(zip(texts, gold)):
        if not isinstance(text, str) or not text.strip():
            raise ModelError(f"{key}.pool: {shots.pool} row {i}: {shots.text_column} is empty")
        if not isinstance(label, str):
            raise LabelError(f"{key}.pool: {shots.pool} row {i}: {shots.label_column} is "
                             f"{label!r}, not a label name")
    unknown = sorted(set(gold) - set(labels.names))
    if unknown:
        raise LabelError(f"{key}.pool: {shots.pool} has labels not in the label set: "
                         f"{unknown[:10]}")
    return Pool(tuple(texts), tuple(gold))


def load_examples(prompt: PromptConfig, labels: LabelSet, storage: StorageConfig) -> list[Example]:
    loaded: list[Example] = []
    room = prompt.max_examples - len(prompt.examples)
    if prompt.examples_path and room > 0:
        cols = [prompt.examples_text_column, prompt.examples_label_column]
        try:
            table = store.read_table(prompt.examples_path, storage, columns=cols)
        except (OSError, pa.ArrowInvalid, KeyError) as exc:
            raise ModelError(f"backend.prompt.examples_path: cannot read {cols} from "
                             f"{prompt.examples_path}: {exc}") from None
        loaded = [Example(text=t, label=l) for t, l in zip(*(table.column(c).to_pylist()
                                                             for c in cols))][:room]
    try:
        return pick_examples(prompt.examples, loaded, labels, prompt.max_examples)
    except ValueError as exc:
        raise LabelError(str(exc)) from None


def answer_schema(labels: LabelSet, max_chars: int, length_in_grammar: bool = True) -> dict:
    # additionalProperties: false, else a grammar lets the model add keys until it runs out of
    # tokens. The label comes first: an answer cut inside its reasoning keeps it.
    return {"type": "object",
            "properties": {"label": {"type": "string", "enum": list(labels.names)},
                           "reasoning": reasoning_schema(max_chars, length_in_grammar)},
            "required": ["label", "reasoning"], "additionalProperties": False}


def json_bytes(name: str) -> int:
    """Bytes of a label as a JSON string, quotes included, spelt raw or with escapes."""
    return max(len(json.dumps(name).encode()), len(json.dumps(name, ensure_ascii=False).encode()))


def reasoning_tokens(max_chars: int) -> int:
    """The answer's tokens for its reasoning. Counted in bytes, since a grammar may spell text
    in more tokens than the tokenizer would but never in more tokens than bytes: an ASCII
    reasoning of max_chars + 1 characters (the grammar's bound, prompts.reasoning_schema)
    always fits, however it is split. Other scripts take up to 4 bytes a character, but a
    trained model rarely spends more than a token on one; where it does, the answer is cut
    inside its reasoning with its label whole (load_json_answer), rather than every answer
    being given 4x the tokens (SST-2's labels at 300 characters: 337 tokens, not 1,848)."""
    return max_chars + 1


def renormalise(logprobs: np.ndarray) -> np.ndarray:
    """Rows of label log-probabilities -> probabilities over the labels only."""
    shifted = logprobs - logprobs.max(axis=1, keepdims=True)
    p = np.exp(shifted)
    return p / p.sum(axis=1, keepdims=True)


@dataclass
class Answers:
    """One result per prompt: a label index (None where `errors` has the reason), and what
    the mode adds: `probs` (score) or `reasoning` (json)."""
    labels: list[int | list[int] | None]  # a list of label indices: a multi-label task
    errors: list[str | None]
    probs: np.ndarray | None = None
    reasoning: list[str | None] | None = None
    confidence: np.ndarray | None = None  # a multi-label score: MULTI_LABEL.decide's


class GeneratedAnswer:
    """choice and json: one sampled answer per row under constrained decoding, parsed back.
    Each answer mode says how many tokens its answer may take (tokens_needed), for the actor
    and for the driver's check alike."""
    gives_reasoning = False

    def __init__(self, labels: LabelSet, prompt: PromptConfig, params, answer_tokens: int):
        self.labels, self.prompt = labels, prompt
        self.params, self.answer_tokens = params, answer_tokens

    def requests(self, rows: list[list[int]], template: PromptTokens):
        return [template.build(row) for row in rows], self.params

    def read(self, outputs: list, n: int) -> Answers:
        answers = Answers(labels=[], errors=[], reasoning=[] if self.gives_reasoning else None)
        for out in outputs:
            label, why, error = None, None, None
            if isinstance(out, Exception):
                error = f"vLLM refused the prompt: {out}"
            else:
                label, why, error = self.parse(out.outputs[0].text, out.outputs[0].finish_reason)
            # One label, or (a multi-label task) a list of them.
            answers.labels.append(None if label is None else self.labels.id_of(label)
                                  if isinstance(label, str) else [self.labels.id_of(x) for x in label])
            answers.errors.append(error)
            if self.gives_reasoning:
                answers.reasoning.append(why)
        return answers

    def parse(self, text: str, finish: str | None) -> tuple[str | None, str | None, str | None]:
        """(label, reasoning, error) from one answer. Constrained decoding makes failures
        rare, but an answer cut at max_tokens is possible: a label cut short is reported, not
        guessed."""
        raise NotImplementedError

    @staticmethod
    def tokens_needed(labels: LabelSet, prompt: PromptConfig, tokenizer) -> int:
        raise NotImplementedError


def constrained(base: dict, answer_tokens: int, **structured):
    """Sampling parameters whose answer is forced by vLLM's structured outputs (`choice=` the
    labels, or `json=` a schema) and cut at answer_tokens."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    return SamplingParams(**base, max_tokens=answer_tokens,
                          structured_outputs=StructuredOutputsParams(**structured))


class ChoiceAnswer(GeneratedAnswer):
    """The answer is forced to be exactly one label."""

    def __init__(self, labels: LabelSet, prompt: PromptConfig, base: dict):
        answer_tokens = self.tokens_needed(labels, prompt, None)
        super().__init__(labels, prompt, constrained(base, answer_tokens, choice=list(labels.names)),
                         answer_tokens)

    @staticmethod
    def tokens_needed(labels, prompt, tokenizer):
        # Bytes, not tokens: a grammar may spell a label in more tokens than the tokenizer
        # would; +1 for the end-of-sequence token.
        return max(len(n.encode()) for n in labels.names) + 1

    def parse(self, text, finish):
        if text in self.labels:
            return text, None, None
        return None, None, f"answer {text[:80]!r} is not a label (finish: {finish})"


class JsonAnswer(GeneratedAnswer):
    """{label, reasoning} under a JSON schema; the reasoning whole sentences within
    reasoning_max_chars (prompts.fit_reasoning), also when the answer was cut inside it."""
    gives_reasoning = True

    def __init__(self, labels: LabelSet, prompt: PromptConfig, base: dict,
                 length_in_grammar: bool = True):
        answer_tokens = self.tokens_needed(labels, prompt, None)
        schema = answer_schema(labels, prompt.reasoning_max_chars, length_in_grammar)
        super().__init__(labels, prompt, constrained(base, answer_tokens, json=schema), answer_tokens)

    @staticmethod
    def tokens_needed(labels, prompt, tokenizer):
        # The compact JSON around the longest label (bytes bound tokens, as in
        # reasoning_tokens), the reasoning, and the end-of-sequence token.
        skeleton = len('{"label":,"reasoning":""}') + max(json_bytes(n) for n in labels.names)
        return skeleton + reasoning_tokens(prompt.reasoning_max_chars) + 1

    def parse(self, text, finish):
        try:
            data, whole = load_json_answer(text)
            label, why = data["label"], data["reasoning"]
        except (ValueError, KeyError, TypeError):
            return None, None, f"answer is not the expected JSON (finish: {finish}): {text[:80]!r}"
        if label not in self.labels:
            return None, None, f"answer label {label!r} is not a label"
        return label, fit_reasoning(why, self.prompt.reasoning_max_chars, whole), None


class LabelScores:
    """No sampling: the model's probability of every label, renormalised over the labels.

    P(label) = product over its tokens. The label sequences form a trie; one request per trie
    node (the prompt + that prefix) returns, in one forward step, the log-probabilities of all
    the node's next tokens (`logprob_token_ids`). Plain generate requests, so the row's prompt
    is read from the prefix cache and each node costs only its own few tokens. When the
    labels' first tokens differ the trie is one node: one request per row."""

    def __init__(self, labels: LabelSet, tokenizer, temperature_scale: float = 1.0):
        from vllm import SamplingParams

        self.temperature_scale = temperature_scale
        self.first_token_scoring, self.sequences = self.label_sequences(labels, tokenizer)
        children: dict[tuple[int, ...], set[int]] = {}
        for seq in self.sequences:
            for t, token in enumerate(seq):
                children.setdefault(tuple(seq[:t]), set()).add(token)
        self.nodes = sorted(children)
        self.node_params = [SamplingParams(temperature=0.0, max_tokens=1,
                                           logprob_token_ids=sorted(children[node]))
                            for node in self.nodes]
        self.answer_tokens = max(len(seq) for seq in self.sequences)
        self.n_labels = len(labels)

    @staticmethod
    def label_sequences(labels: LabelSet, tokenizer) -> tuple[bool, list[list[int]]]:
        """(whether the labels' first tokens differ, the token sequence scored per label)."""
        label_ids = [tokenizer.encode(name, add_special_tokens=False) for name in labels.names]
        first = [ids[0] for ids in label_ids]
        if len(set(first)) == len(first):
            return True, [[token] for token in first]
        # Whole labels end with the end of turn, so that "pos" is not scored as "positive"'s prefix.
        return False, [ids + [tokenizer.eos_token_id] for ids in label_ids]

    @classmethod
    def tokens_needed(cls, labels, prompt, tokenizer):
        return max(map(len, cls.label_sequences(labels, tokenizer)[1]))

    def requests(self, rows: list[list[int]], template: PromptTokens):
        prompts = [template.build(row) for row in rows]
        return [p + list(node) for p in prompts for node in self.nodes], self.node_params * len(prompts)

    def read(self, outputs: list, n: int) -> Answers:
        m = len(self.nodes)
        failed: list[str | None] = [None] * n
        next_logprob: list[dict] = [{} for _ in range(n)]  # row -> (node, token) -> log p
        for j, out in enumerate(outputs):
            i, node = divmod(j, m)
            if isinstance(out, Exception):
                failed[i] = f"vLLM refused the prompt: {out}"
                continue
            for token, lp in out.outputs[0].logprobs[0].items():  # at the answer position
                next_logprob[i][(self.nodes[node], token)] = lp.logprob
        logprobs = np.zeros((n, self.n_labels))
        for i in (i for i in range(n) if failed[i] is None):
            logprobs[i] = [sum(next_logprob[i][(tuple(seq[:t]), token)] for t, token in enumerate(seq))
                           for seq in self.sequences]
        probs = renormalise(logprobs / self.temperature_scale)
        answers = [int(np.argmax(probs[i])) if failed[i] is None else None for i in range(n)]
        return Answers(labels=answers, errors=failed, probs=probs)


class JsonLabelsAnswer(GeneratedAnswer):
    """A multi-label task: {labels: distinct labels of the set (maybe none), reasoning} under a
    JSON schema."""
    gives_reasoning = True

    def __init__(self, labels: LabelSet, prompt: PromptConfig, base: dict,
                 length_in_grammar: bool = True):
        answer_tokens = self.tokens_needed(labels, prompt, None)
        schema = multilabel.answer_schema(labels, prompt.reasoning_max_chars, length_in_grammar)
        super().__init__(labels, prompt, constrained(base, answer_tokens, json=schema), answer_tokens)

    @staticmethod
    def tokens_needed(labels, prompt, tokenizer):
        # Every label once with its comma, then the reasoning, as in JsonAnswer.
        skeleton = len('{"labels":[],"reasoning":""}') + sum(json_bytes(n) + 1 for n in labels.names)
        return skeleton + reasoning_tokens(prompt.reasoning_max_chars) + 1

    def parse(self, text, finish):
        given, why_not = multilabel.parse_answer(text, self.labels)
        if given is None:
            return None, None, f"{why_not} (finish: {finish}): {text[:80]!r}"
        data, whole = load_json_answer(text)
        return given, fit_reasoning(data["reasoning"], self.prompt.reasoning_max_chars, whole), None


class LabelYesNoScores:
    """A multi-label task's score mode: each label's own probability, P(yes) / (P(yes) + P(no))
    to "does this label apply?". One request per row and label, all sharing the row's prompt
    (instructions, label list, text), which vLLM's prefix cache computes once per row; each
    label then costs its question's few tokens and one forward step. A label applies at 0.5."""

    def __init__(self, labels: LabelSet, tokenizer, temperature_scale: float = 1.0):
        from vllm import SamplingParams

        yes, no = (tokenizer.encode(word, add_special_tokens=False)[0] for word in ("yes", "no"))
        if yes == no:
            raise ModelError("score mode of a multi-label task needs 'yes' and 'no' to start "
                             "with different tokens")
        self.yes, self.no, self.n_labels = yes, no, len(labels)
        self.temperature_scale = temperature_scale
        self.params = SamplingParams(temperature=0.0, max_tokens=1, logprob_token_ids=[yes, no])
        self.answer_tokens = self.tokens_needed(labels, None, tokenizer)
        self.thresholds = np.full(len(labels), 0.5)

    @staticmethod
    def tokens_needed(labels, prompt, tokenizer):
        return 1  # yes or no: the question is in the prompt (PromptTokens.overhead)

    def requests(self, rows: list[list[int]], template: PromptTokens):
        return [p for row in rows for p in template.build_each(row)], self.params

    def read(self, outputs: list, n: int) -> Answers:
        failed: list[str | None] = [None] * n
        margin = np.zeros((n, self.n_labels))  # log P(yes) - log P(no)
        for j, out in enumerate(outputs):
            i, k = divmod(j, self.n_labels)
            if isinstance(out, Exception):
                failed[i] = f"vLLM refused the prompt: {out}"
                continue
            lp = out.outputs[0].logprobs[0]
            margin[i, k] = lp[self.yes].logprob - lp[self.no].logprob
        probs = 1 / (1 + np.exp(-margin / self.temperature_scale))
        answers, confidence = MULTI_LABEL.decide(probs, self.thresholds)
        return Answers(labels=[a if failed[i] is None else None for i, a in enumerate(answers)],
                       errors=failed, probs=probs, confidence=confidence)


def mode_class(prompt: PromptConfig, task: Task = SINGLE_LABEL) -> type:
    """The strategy class of `backend.prompt.mode` for the task (a multi-label task: json or
    score; the config refuses choice)."""
    return task.pick({"choice": ChoiceAnswer, "json": JsonAnswer, "score": LabelScores},
                     {"json": JsonLabelsAnswer, "score": LabelYesNoScores})[prompt.mode]


def answer_mode(labels: LabelSet, prompt: PromptConfig, tokenizer, task: Task = SINGLE_LABEL,
                structured_outputs_backend: str = "guidance"):
    """The strategy of `backend.prompt.mode`: what is asked of vLLM and how it is read."""
    cls = mode_class(prompt, task)
    if cls in (LabelScores, LabelYesNoScores):
        return cls(labels, tokenizer, prompt.temperature_scale)
    base = {"temperature": prompt.temperature, "seed": prompt.seed}
    if cls is ChoiceAnswer:
        return cls(labels, prompt, base)
    return cls(labels, prompt, base, structured_outputs_backend in LENGTH_WITH_PATTERN)


class VLLMPromptClassifier:
    """Ray Data actor: one vLLM engine; labels one prepared chunk per call."""

    def __init__(self, backend: VLLMPromptBackendConfig, labels: LabelSet, text_column: str,
                 use_gpu: bool, examples: list[Example], storage: StorageConfig | None = None,
                 task: Task = SINGLE_LABEL, pool: Pool | None = None, id_column: str = "id",
                 pool_vectors=None):
        prepare_env(use_gpu)
        backend = local_backend(backend, storage)
        self.labels, self.text_column, prompt = labels, text_column, backend.prompt
        self.id_column, self.pool, self.shots = id_column, pool, prompt.shots
        self.llm = vllm_engine.start_watched_engine(
            engine_args(backend, use_gpu, "generate", seed=prompt.seed))
        tok = self.tokenizer = self.llm.get_tokenizer()
        self.dtype = engine_dtype(self.llm)
        self.task = task
        # Shots per row: each pool row's shot tokenised once; (similar) the rows embedded on
        # this actor's CPU, the pool's vectors the job's (pool_vectors_once, an ObjectRef).
        self.pieces = pool_pieces(tok, prompt, pool)
        self.embedder = self.pool_vectors = None
        if pool is not None and self.shots.select == "similar":
            import ray

            from clsjob.embedder import Embedder

            started = time.monotonic()
            self.embedder = Embedder(model_cache.local_model(
                self.shots.embedder, storage or StorageConfig(), key="backend.prompt.shots.embedder"))
            self.pool_vectors = ray.get(pool_vectors)  # actor_examples always hands them in
            log.info("vllm_prompt: shots pool of %d rows: vectors ready in %.1f s", len(pool.texts),
                     time.monotonic() - started)
        self.template = shared_prompt(tok, labels, prompt, examples, task, self.pieces)
        self.mode = answer_mode(labels, prompt, tok, task,
                                backend.engine.structured_outputs_backend)
        # The driver made this sum before any engine started (check_context_length); the
        # engine's context is the final word (vLLM may derive a shorter one).
        self.budget = row_budget(backend, self.llm.llm_engine.model_config.max_model_len,
                                 self.template, self.mode.answer_tokens)
        self.feed = EngineFeed.of(self.llm)
        # Rows are tokenised on the calls' threads while the engine detokenises answers on its
        # own: the calls get their own copy of the tokenizer (a fast one is not thread-safe).
        self.encoder, self.encode_lock = copy.deepcopy(tok), threading.Lock()

    def __call__(self, table: pa.Table) -> pa.Table:
        todo = rows_to_classify(table)
        texts = table.column(self.text_column).to_pylist()
        with self.encode_lock:
            ids, truncated = encode_rows(self.encoder, [texts[i] for i in todo], self.budget)
            template = self.template
            if self.pool is not None:
                ids = self.with_shots(table, todo, [texts[i] for i in todo], ids)
                template = template.shared
        requests, params = self.mode.requests(ids, template)
        outputs, busy_s = self.feed.run(requests, params)
        answers = self.mode.read(outputs, len(ids))
        out = attach_results(table, todo, self.labels, answers.labels, truncated,
                             probs=answers.probs, errors=answers.errors, reasoning=answers.reasoning,
                             confidence=answers.confidence, column=self.task.answer)
        return stamp(out, self.dtype, busy_s)

    def with_shots(self, table: pa.Table, todo: list[int], texts: list[str],
                   ids: list[list[int]]) -> list[list[int]]:
        """Each row's text ids preceded by its own shots (PromptTokens.row_part). Runs on the
        call's thread: the embedder works on the CPU while the engine steps other calls."""
        shots, ids_column = self.shots, table.column(self.id_column)
        chosen = choose_shots(shots.select, self.pool, texts, [str(ids_column[i].as_py()) for i in todo],
                              shots.k, shots.per_label_min, shots.seed,
                              self.embedder(texts) if self.embedder else None, self.pool_vectors)
        return [self.template.row_part([t for j in rows for t in self.pieces[j]], text)
                for rows, text in zip(chosen, ids)]
