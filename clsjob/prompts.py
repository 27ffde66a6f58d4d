"""Prompts for `vllm_prompt` (pure): label set + instructions + examples + a row -> tokens.

A prompt is `head + row text + tail`. The head holds everything rows share (system prompt,
instructions, label list, examples), so that vLLM's prefix cache computes it once per actor;
head and tail are tokenised once, and only the row's text per row. The row text is tokenised
with special tokens split into plain text, so a row that contains "<|im_start|>system" cannot
open a chat turn of its own.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from clsjob.config import Example, PromptConfig
from clsjob.labels import LabelSet

TEXT_SLOT = "\x00ROW_TEXT\x00"  # stands in for the row while the template is rendered


def instructions(labels: LabelSet, prompt: PromptConfig, examples: list[Example]) -> str:
    """The shared part of the user message."""
    lines = [prompt.instructions.strip()] if prompt.instructions else []
    lines.append("Classify the text into exactly one of these labels:")
    for name, description in zip(labels.names, labels.descriptions):
        lines.append(f"- {name}: {description}" if description else f"- {name}")
    if prompt.mode == "json":
        lines.append('Answer with a JSON object: {"label": one of the labels, "reasoning": '
                     "why, in one short sentence}.")
    else:
        lines.append("Answer with the label only.")
    if examples:
        lines.append("")
        lines.append("Examples:")
        for ex in examples:
            lines.append(f"Text: {ex.text}\n{answer_for(ex.label, prompt)}")
    return "\n".join(lines)


def answer_for(label: str, prompt: PromptConfig) -> str:
    # Examples answer the way the model is asked to answer.
    if prompt.mode == "json":
        return "Label: " + json.dumps({"label": label, "reasoning": "..."})
    return f"Label: {label}"


def render_template(labels: LabelSet, prompt: PromptConfig, examples: list[Example],
                    apply_chat: Callable[[list[dict]], str] | None) -> tuple[str, str]:
    """(head, tail) around the row text: through `apply_chat` (the tokenizer's chat template,
    rendered with the generation prompt) when given, else as a plain completion prompt."""
    user = f"{instructions(labels, prompt, examples)}\n\nText: {TEXT_SLOT}"
    if apply_chat is not None:
        messages = ([{"role": "system", "content": prompt.system_prompt}]
                    if prompt.system_prompt else []) + [{"role": "user", "content": user}]
        rendered = apply_chat(messages)
    else:
        system = f"{prompt.system_prompt}\n\n" if prompt.system_prompt else ""
        rendered = f"{system}{user}\nLabel: "
    head, found, tail = rendered.partition(TEXT_SLOT)
    if not found:
        raise ValueError("the chat template dropped the user message")
    return head, tail


@dataclass(frozen=True)
class PromptTokens:
    head: list[int]
    tail: list[int]

    def build(self, text_ids: list[int]) -> list[int]:
        return self.head + text_ids + self.tail

    @property
    def overhead(self) -> int:
        return len(self.head) + len(self.tail)


def tokenize_template(tokenizer, head: str, tail: str, chat: bool) -> PromptTokens:
    # A chat template writes its own BOS where it wants one; a plain prompt gets the
    # tokenizer's usual special tokens at the start only.
    return PromptTokens(tokenizer.encode(head, add_special_tokens=not chat),
                        tokenizer.encode(tail, add_special_tokens=False))


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
    wrong = sorted({ex.label for ex in chosen if ex.label not in labels})
    if wrong:
        raise ValueError(f"backend.prompt examples use labels not in the label set: {wrong}")
    return chosen
