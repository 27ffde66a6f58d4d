"""vllm_prompt's answer budget and the driver's refusal of a context too short, with a tiny
tokenizer and no engine; json mode's schema walked through llguidance (the grammar library
vLLM runs by default) with random tokens, as a model with random weights would pick them."""
import json
import random
import re

import numpy as np
import pytest

from clsjob import backends
from clsjob.backends import ModelError
from clsjob.backends.vllm_prompt import (JsonAnswer, JsonLabelsAnswer, answer_schema, mode_class,
                                         shared_prompt)
from clsjob.config import ClassifyConfig, PromptConfig, validate
from clsjob.evaluation.multilabel import answer_schema as labels_schema
from clsjob.labels import LabelSet
from clsjob.prompts import REASONING_PATTERN, fit_reasoning, load_json_answer
from clsjob.task import MULTI_LABEL, SINGLE_LABEL
from faulty_s3 import FaultyS3
# Fixtures are found by name in the module that uses them.
from s3_fixtures import BUCKET, aws_env, s3  # noqa: F401
from tiny_models import build_tokenizer

SST2 = LabelSet(("negative", "positive"))


def test_the_json_answer_budget_is_its_bytes_not_six_per_character():
    # {"label":"positive","reasoning":"<301 characters>"} and the end of the sequence: what
    # the grammar allows of an ASCII reasoning, a token at least a byte. Was 1,848.
    prompt = PromptConfig(mode="json", reasoning_max_chars=300)
    assert JsonAnswer.tokens_needed(SST2, prompt, None) == 35 + 301 + 1
    assert JsonLabelsAnswer.tokens_needed(SST2, prompt, None) == len(
        '{"labels":["negative","positive"],"reasoning":""}') + 1 + 301 + 1
    # A label the grammar may spell with escapes counts its longest spelling.
    assert JsonAnswer.tokens_needed(LabelSet(("café",)), prompt, None) == 25 + 11 + 301 + 1


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """What the driver reads of a model folder: config.json, the tokenizer, and the names of
    the weights (never their bytes)."""
    folder = tmp_path_factory.mktemp("lm")
    build_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "max_position_embeddings": 512,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def prompted(folder, mode: str = "json", max_model_len: int | None = 512, **prompt) -> ClassifyConfig:
    engine = {"max_model_len": max_model_len} if max_model_len else {}
    return validate({"input": {"path": "unused"}, "labels": ["negative", "positive"],
                     "output": {"path": "unused"},
                     "backend": {"kind": "vllm_prompt", "model": str(folder), "max_length": 64,
                                 "prompt": {"mode": mode, **prompt}, "engine": engine}},
                    model=ClassifyConfig)


def check(cfg: ClassifyConfig):
    return backends.check_model(cfg.backend, LabelSet.from_specs(cfg.labels), cfg.storage)


@pytest.mark.parametrize("mode", ["choice", "json", "score"])
def test_the_driver_refuses_a_context_too_short_and_names_the_least_that_works(model_folder, mode):
    tok = build_tokenizer(model_folder / "tok")
    # json's reasoning capped to keep the least context that works within the model's 512.
    short = {"instructions": "Read the review with care. " * 3, "reasoning_max_chars": 200}
    cfg = prompted(model_folder, mode, 64, **short)
    template = shared_prompt(tok, SST2, cfg.backend.prompt, [])
    answer = mode_class(cfg.backend.prompt).tokens_needed(SST2, cfg.backend.prompt, tok)
    need = template.overhead + answer + 1
    with pytest.raises(ModelError) as refused:
        check(cfg)
    assert str(refused.value) == (
        f"backend.engine.max_model_len 64 leaves no room for the row text: the shared prompt "
        f"takes {template.overhead} tokens and the answer up to {answer}; set "
        f"backend.engine.max_model_len to at least {need} ({need + 63} keeps rows of "
        f"backend.max_length 64 tokens whole)")
    assert need <= 512
    check(prompted(model_folder, mode, need, **short))
    with pytest.raises(ModelError, match=f"at least {need} "):
        check(prompted(model_folder, mode, need - 1, **short))


def test_unset_max_model_len_is_the_models_own_context(model_folder):
    check(prompted(model_folder, max_model_len=None, reasoning_max_chars=100))
    with pytest.raises(ModelError, match=r"the model's context of 512 tokens \(backend.engine."
                                         r"max_model_len is unset\) .* shorten the shared prompt"):
        check(prompted(model_folder, max_model_len=None, reasoning_max_chars=500))


def test_a_context_beyond_the_models_positions_is_refused_on_the_driver(model_folder):
    """vLLM refuses it only at each actor's engine start (and Ray Data retries each)."""
    with pytest.raises(ModelError) as refused:
        check(prompted(model_folder, max_model_len=1024))
    assert str(refused.value) == (
        f"backend.engine.max_model_len 1024 exceeds {model_folder}'s own context of 512 tokens "
        f"(max_position_embeddings in its config.json); set it to 512 or less, or leave it unset")
    check(prompted(model_folder, max_model_len=512, reasoning_max_chars=100))


def test_an_s3_model_is_checked_from_its_tokenizer_files_without_its_weights(model_folder, s3):
    """The driver fetches an s3:// folder's small files (tokenizer, config) to sum the prompt,
    never the weights: the S3 endpoint is asked for no byte of model.safetensors."""
    with FaultyS3(s3.endpoint, every=None) as counting:
        for path in sorted(p for p in model_folder.iterdir() if p.is_file()):
            s3.client.upload_file(str(path), BUCKET, f"models/lm/{path.name}")
        cfg = prompted(f"s3://{BUCKET}/models/lm", "json", 64)
        cfg = cfg.model_copy(update={"storage": cfg.storage.model_copy(
            update={"endpoint_url": counting.endpoint})})
        with pytest.raises(ModelError, match="backend.engine.max_model_len 64 leaves no room"):
            check(cfg)
    assert counting.requests[("GET", f"/{BUCKET}/models/lm/tokenizer.json")] == 1
    assert counting.requests[("GET", f"/{BUCKET}/models/lm/model.safetensors")] == 0


def sample_answer(matcher, ll, rng: random.Random, shortest: bool, byte_len: dict) -> list[int]:
    """Tokens the grammar allows, one at a time, picked at random (or the shortest allowed,
    the most tokens an answer can take) until it ends."""
    import llguidance.numpy as lnp

    mask = lnp.allocate_token_bitmask(1, ll.vocab_size)
    ids = []
    while not matcher.is_stopped():
        lnp.fill_next_token_bitmask(matcher, mask, 0)
        bits = np.unpackbits(mask[0].view(np.uint8), bitorder="little")
        allowed = np.flatnonzero(bits[:ll.vocab_size])
        if shortest:
            least = min(byte_len[t] for t in allowed)
            allowed = [t for t in allowed if byte_len[t] == least]
        token = int(rng.choice(list(allowed)))
        assert matcher.consume_token(token), matcher.get_error()
        ids.append(token)
    return ids


@pytest.mark.parametrize("multi_label", [False, True])
def test_json_answers_under_guidance_end_at_a_sentence_and_fit_their_budget(tmp_path, multi_label):
    """Any answer the grammar lets through: its reasoning holds no double quote, ends at a
    sentence's end within reasoning_max_chars + 1 characters, and the whole answer (end of
    sequence included) fits the token budget even spelt in the shortest tokens."""
    llguidance = pytest.importorskip("llguidance")
    import llguidance.hf

    tok = build_tokenizer(tmp_path)
    ll = llguidance.hf.from_tokenizer(tok)
    prompt = PromptConfig(mode="json", reasoning_max_chars=30)
    labels = LabelSet(("negative", "neutral", "positive"))
    schema = (labels_schema(labels, 30) if multi_label else answer_schema(labels, 30))
    budget = mode_class(prompt, MULTI_LABEL if multi_label else SINGLE_LABEL).tokens_needed(labels, prompt, tok)
    # As vLLM's guidance back end compiles it, with clsjob's disable_any_whitespace.
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        schema, defaults={"whitespace_flexible": False})
    byte_len = {i: len(tok.decode([i]).encode()) for i in range(len(tok))}
    rng = random.Random(0)
    for k in range(60):
        ids = sample_answer(llguidance.LLMatcher(ll, grammar), ll, rng, shortest=k % 2 == 1,
                            byte_len=byte_len)
        text = tok.decode(ids)
        answer, whole = load_json_answer(text)
        assert whole and len(ids) + 1 <= budget, (len(ids), budget, text)
        reasoning = answer["reasoning"]
        assert re.fullmatch(REASONING_PATTERN.strip("^$"), reasoning) and len(reasoning) <= 31, text
        assert set(answer["labels"] if multi_label else [answer["label"]]) <= set(labels.names)
        fitted = fit_reasoning(reasoning, 30)
        assert len(fitted) <= 30 and (fitted == reasoning or len(reasoning) == 31)
