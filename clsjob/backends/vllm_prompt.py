"""`vllm_prompt` back end: a generative LLM, prompted, whose answer is forced into the label set.

Three modes (`backend.prompt.mode`):
- choice: structured outputs with `choice=labels`; the answer is exactly one label.
- json:   a JSON schema {label: one of the labels, reasoning: str ≤ N chars}.
- score:  no sampling: the model's probability of every label. When the labels' first tokens
          differ, one forward step per row gives them all (`logprob_token_ids`), renormalised
          over the labels; otherwise each label's whole token sequence (+ end of turn) is
          scored, one step per node of the labels' token trie, the row's prompt read from the
          prefix cache.
task: multi_label: json = {labels: a list of distinct labels, reasoning}; score = each label's
own yes/no probability, one request per row and label sharing the row's cached prompt.
Rows whose prompt would not fit `max_model_len` are cut to fit and flagged; a row vLLM still
refuses gets `error` and the chunk goes on.
The engine is shared by the actor's calls (vllm_engine.EngineFeed): the next chunk's rows join
the engine's batch while the last one's answers finish, and are tokenised beside it.
"""
from __future__ import annotations

import copy
import json
import threading
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import ConfigDict, Field, create_model

from clsjob import multilabel, store
from clsjob.backends import CheckedModel, ModelError, check_model_files, local_backend
from clsjob.backends.rows import attach_results, rows_to_classify, stamp
from clsjob.backends import vllm_engine
from clsjob.backends.vllm_engine import EngineFeed, engine_args, engine_dtype, prepare_env
from clsjob.config import Example, PromptConfig, StorageConfig, VLLMPromptBackendConfig
from clsjob.labels import LabelError, LabelSet
from clsjob.prompts import (PromptTokens, encode_rows, pick_examples, render_template,
                            tokenize_template)


def check_prompted_model(backend: VLLMPromptBackendConfig, labels: LabelSet,
                         storage: StorageConfig) -> CheckedModel:
    config = check_model_files(backend, storage)
    architectures = config.get("architectures") or []
    if not any(a.endswith(("ForCausalLM", "ForConditionalGeneration")) for a in architectures):
        raise ModelError(f"backend.model: {backend.model} is {architectures}, not a generative "
                         f"(*ForCausalLM) model; a merged classifier runs under hf or vllm_pool")
    load_examples(backend.prompt, labels, storage)  # labels of the examples, before any row
    # score mode's label log-probabilities are divided by temperature_scale; the others give
    # no probabilities.
    scale = backend.prompt.temperature_scale if backend.prompt.mode == "score" else None
    return CheckedModel(labels, scale, config)


def actor_examples(backend: VLLMPromptBackendConfig, labels: LabelSet,
                   storage: StorageConfig) -> dict:
    """The few-shot examples, read once on the driver and handed to every actor."""
    return {"examples": load_examples(backend.prompt, labels, storage)}


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


def answer_schema(labels: LabelSet, max_chars: int) -> dict:
    # extra="forbid" -> additionalProperties: false; without it a grammar lets the model add
    # keys until it runs out of tokens.
    answer = create_model("Answer", __config__=ConfigDict(extra="forbid"),
                          label=(Literal[tuple(labels.names)], ...),
                          reasoning=(str, Field(max_length=max_chars)))
    return answer.model_json_schema()


def renormalise(logprobs: np.ndarray) -> np.ndarray:
    """Rows of label log-probabilities -> probabilities over the labels only."""
    shifted = logprobs - logprobs.max(axis=1, keepdims=True)
    p = np.exp(shifted)
    return p / p.sum(axis=1, keepdims=True)


@dataclass
class Answers:
    """One result per prompt: a label index (None where `errors` has the reason), and what
    the mode adds: `probs` (score) or `reasoning` (json)."""
    labels: list[int | list[int] | None]  # a list of label indices: multi_label
    errors: list[str | None]
    probs: np.ndarray | None = None
    reasoning: list[str | None] | None = None
    confidence: np.ndarray | None = None  # multi_label score: multilabel.decide's


class GeneratedAnswer:
    """choice and json: one sampled answer per row under constrained decoding, parsed back."""
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
            # One label, or (multi_label) a list of them.
            answers.labels.append(None if label is None else self.labels.id_of(label)
                                  if isinstance(label, str) else [self.labels.id_of(x) for x in label])
            answers.errors.append(error)
            if self.gives_reasoning:
                answers.reasoning.append(why)
        return answers

    def parse(self, text: str, finish: str | None) -> tuple[str | None, str | None, str | None]:
        """(label, reasoning, error) from one answer. Constrained decoding makes failures
        rare, but an answer cut at max_tokens is possible and is reported, not guessed."""
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
        # Bytes, not tokens: a grammar may spell a label in more tokens than the tokenizer
        # would; +1 for the end-of-sequence token.
        answer_tokens = max(len(n.encode()) for n in labels.names) + 1
        super().__init__(labels, prompt, constrained(base, answer_tokens, choice=list(labels.names)),
                         answer_tokens)

    def parse(self, text, finish):
        if text in self.labels:
            return text, None, None
        return None, None, f"answer {text[:80]!r} is not a label (finish: {finish})"


class JsonAnswer(GeneratedAnswer):
    """{label, reasoning} under a JSON schema."""
    gives_reasoning = True

    def __init__(self, labels: LabelSet, prompt: PromptConfig, base: dict):
        # Bytes of the longest answer the schema allows: a character of reasoning is at most
        # 6 bytes (a \uXXXX escape), a label at most its bytes plus escapes.
        longest = max(len(n.encode()) for n in labels.names)
        answer_tokens = 32 + 2 * longest + 6 * prompt.reasoning_max_chars
        schema = answer_schema(labels, prompt.reasoning_max_chars)
        super().__init__(labels, prompt, constrained(base, answer_tokens, json=schema), answer_tokens)

    def parse(self, text, finish):
        try:
            data = json.loads(text)
            label, why = data["label"], data["reasoning"]
        except (ValueError, KeyError, TypeError):
            return None, None, f"answer is not the expected JSON (finish: {finish}): {text[:80]!r}"
        if label not in self.labels:
            return None, None, f"answer label {label!r} is not a label"
        return label, why, None


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
        label_ids = [tokenizer.encode(name, add_special_tokens=False) for name in labels.names]
        first = [ids[0] for ids in label_ids]
        self.first_token_scoring = len(set(first)) == len(first)
        # Whole labels end with the end of turn, so that "pos" is not scored as "positive"'s prefix.
        self.sequences = ([[ids[0]] for ids in label_ids] if self.first_token_scoring
                          else [ids + [tokenizer.eos_token_id] for ids in label_ids])
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
    """task: multi_label: {labels: distinct labels of the set (maybe none), reasoning} under a
    JSON schema."""
    gives_reasoning = True

    def __init__(self, labels: LabelSet, prompt: PromptConfig, base: dict):
        # Every label once (quoted, comma), the reasoning's bytes as in JsonAnswer.
        answer_tokens = 32 + sum(2 * len(n.encode()) + 4 for n in labels.names) \
            + 6 * prompt.reasoning_max_chars
        schema = multilabel.answer_schema(labels, prompt.reasoning_max_chars)
        super().__init__(labels, prompt, constrained(base, answer_tokens, json=schema), answer_tokens)

    def parse(self, text, finish):
        given, why_not = multilabel.parse_answer(text, self.labels)
        if given is None:
            return None, None, f"{why_not} (finish: {finish}): {text[:80]!r}"
        return given, json.loads(text).get("reasoning"), None


class LabelYesNoScores:
    """task: multi_label score mode: each label's own probability, P(yes) / (P(yes) + P(no))
    to "does this label apply?". One request per row and label, all sharing the row's prompt
    (instructions, label list, text), which vLLM's prefix cache computes once per row; each
    label then costs its question's few tokens and one forward step. A label applies at 0.5."""

    def __init__(self, labels: LabelSet, tokenizer, temperature_scale: float = 1.0):
        from vllm import SamplingParams

        yes, no = (tokenizer.encode(word, add_special_tokens=False)[0] for word in ("yes", "no"))
        if yes == no:
            raise ModelError("score mode under task: multi_label needs 'yes' and 'no' to start "
                             "with different tokens")
        self.yes, self.no, self.n_labels = yes, no, len(labels)
        self.temperature_scale = temperature_scale
        self.params = SamplingParams(temperature=0.0, max_tokens=1, logprob_token_ids=[yes, no])
        self.answer_tokens = 1
        self.thresholds = np.full(len(labels), 0.5)

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
        applies, confidence = multilabel.decide(probs, self.thresholds)
        return Answers(labels=[np.flatnonzero(a).tolist() if failed[i] is None else None
                               for i, a in enumerate(applies)],
                       errors=failed, probs=probs, confidence=confidence)


def answer_mode(labels: LabelSet, prompt: PromptConfig, tokenizer, multi_label: bool = False):
    """The strategy of `backend.prompt.mode`: what is asked of vLLM and how it is read."""
    base = {"temperature": prompt.temperature, "seed": prompt.seed}
    if multi_label:  # json or score (config.py refuses choice)
        return (JsonLabelsAnswer(labels, prompt, base) if prompt.mode == "json"
                else LabelYesNoScores(labels, tokenizer, prompt.temperature_scale))
    if prompt.mode == "choice":
        return ChoiceAnswer(labels, prompt, base)
    if prompt.mode == "json":
        return JsonAnswer(labels, prompt, base)
    return LabelScores(labels, tokenizer, prompt.temperature_scale)


class VLLMPromptClassifier:
    """Ray Data actor: one vLLM engine; labels one prepared chunk per call."""

    def __init__(self, backend: VLLMPromptBackendConfig, labels: LabelSet, text_column: str,
                 use_gpu: bool, examples: list[Example], storage: StorageConfig | None = None,
                 multi_label: bool = False):
        prepare_env(use_gpu)
        backend = local_backend(backend, storage)
        self.labels, self.text_column, prompt = labels, text_column, backend.prompt
        self.llm = vllm_engine.start_watched_engine(
            engine_args(backend, use_gpu, "generate", seed=prompt.seed))
        tok = self.tokenizer = self.llm.get_tokenizer()
        self.dtype = engine_dtype(self.llm)
        chat = prompt.chat_template == "on" or (
            prompt.chat_template == "auto" and getattr(tok, "chat_template", None))
        apply_chat = (lambda m: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                      ) if chat else None
        self.multi_label = multi_label
        self.template = tokenize_template(
            tok, *render_template(labels, prompt, examples, apply_chat, multi_label), chat=bool(chat),
            labels=labels if multi_label and prompt.mode == "score" else None)
        self.mode = answer_mode(labels, prompt, tok, multi_label)
        limit = self.llm.llm_engine.model_config.max_model_len
        self.budget = min(backend.max_length, limit - self.template.overhead - self.mode.answer_tokens)
        if self.budget < 1:
            raise ModelError(f"backend.engine.max_model_len {limit} leaves "
                             f"no room for the row text: the shared prompt takes "
                             f"{self.template.overhead} tokens and the answer {self.mode.answer_tokens}")
        self.feed = EngineFeed.of(self.llm)
        # Rows are tokenised on the calls' threads while the engine detokenises answers on its
        # own: the calls get their own copy of the tokenizer (a fast one is not thread-safe).
        self.encoder, self.encode_lock = copy.deepcopy(tok), threading.Lock()

    def __call__(self, table: pa.Table) -> pa.Table:
        todo = rows_to_classify(table)
        texts = table.column(self.text_column).to_pylist()
        with self.encode_lock:
            ids, truncated = encode_rows(self.encoder, [texts[i] for i in todo], self.budget)
        requests, params = self.mode.requests(ids, self.template)
        outputs, busy_s = self.feed.run(requests, params)
        answers = self.mode.read(outputs, len(ids))
        out = attach_results(table, todo, self.labels, answers.labels, truncated,
                             probs=answers.probs, errors=answers.errors, reasoning=answers.reasoning,
                             confidence=answers.confidence, multi_label=self.multi_label)
        return stamp(out, self.dtype, busy_s)
