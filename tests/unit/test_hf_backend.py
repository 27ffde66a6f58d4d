"""The hf back end on CPU with tiny models, called directly (no Ray)."""
import shutil
import socket

import numpy as np
import pyarrow as pa
import pytest

import torch

from clsjob.backends import CheckedModel, GPUMissing, ModelError, check_task
from clsjob.backends.hf import (HFClassifier, batching, check_model_folder, encode_truncating,
                                length_sorted_batches, load_classifier, predict, predict_probs,
                                queued_probs)
from clsjob.config import HFBackendConfig, InputConfig
from clsjob.contract import DTYPE
from clsjob.labels import LabelError, LabelSet
from clsjob.precision import cpu_flags, resolve_dtype
from clsjob.representation import HeadInput
from clsjob.run.prepare import prepare_chunk
from helpers import LABELS, sample_texts
from tiny_models import build_qwen2_classifier


def test_auto_dtype_on_cpu_is_bf16_only_where_the_cpu_multiplies_it_natively(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    assert cpu_flags(cpuinfo) == {"fpu", "sse2", "avx2", "avx512f", "avx512_vnni"}
    assert cpu_flags(tmp_path / "absent") == set()
    assert resolve_dtype("auto", "cpu", cpu_flags(cpuinfo)) == "float32"
    assert resolve_dtype("auto", "cpu", {"avx512f", "avx512_bf16"}) == "bfloat16"
    assert resolve_dtype("auto", "cpu", {"amx_tile", "amx_bf16"}) == "bfloat16"
    # An explicit backend.dtype is taken as given, whatever the hardware.
    assert resolve_dtype("float32", "cpu", {"amx_bf16"}) == "float32"
    assert resolve_dtype("bfloat16", "cpu", set()) == "bfloat16"


def test_actor_runs_in_the_dtype_it_resolves_and_stamps_it_on_the_chunk(qwen_model):
    chunk = prepare_chunk(pa.table({"text": sample_texts(6, seed=2)}), "s.parquet", 0,
                          InputConfig(path="unused"))
    probs = {}
    for dtype in ("float32", "bfloat16"):
        backend = HFBackendConfig(model=str(qwen_model), max_length=64, dtype=dtype)
        actor = HFClassifier(backend, None, "text", use_gpu=False)
        assert actor.model.dtype == getattr(torch, dtype)
        out = actor(chunk)
        assert out.column(DTYPE).to_pylist() == [dtype] * 6
        probs[dtype] = np.array(out.column("probs").to_pylist())
    # bf16 keeps 8 bits of mantissa: probabilities move in the second or third decimal.
    assert 0 < np.abs(probs["bfloat16"] - probs["float32"]).max() < 0.02


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_actor_given_a_gpu_it_cannot_find_fails_naming_the_node(qwen_model):
    # Running on the CPU instead would be a mis-scheduled job, 100x slow: refuse at start.
    with pytest.raises(GPUMissing, match=rf"node {socket.gethostname()} .*finds no CUDA device"):
        HFClassifier(HFBackendConfig(model=str(qwen_model)), None, "text", use_gpu=True)
    actor = HFClassifier(HFBackendConfig(model=str(qwen_model)), None, "text", use_gpu=False)
    assert actor.device == "cpu"
    assert next(actor.model.parameters()).dtype == getattr(torch, resolve_dtype("auto", "cpu"))


def test_length_sorted_batches_cover_all_rows_once():
    lengths = [5, 1, 9, 3, 3, 7, 2]
    batches = length_sorted_batches(lengths, 3)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert [[lengths[i] for i in b] for b in batches] == [[1, 2, 3], [3, 5, 7], [9]]


@pytest.mark.parametrize("model_fixture", ["qwen_model", "bert_model"])
def test_batched_probabilities_equal_one_row_at_a_time(model_fixture, request):
    """Right padding + length sorting must not change any row's answer: a decoder pools on
    its last non-pad token, so a padding bug shows up here as different probabilities."""
    backend = HFBackendConfig(model=str(request.getfixturevalue(model_fixture)), max_length=64)
    model, tok = load_classifier(backend, "cpu")
    texts = sample_texts(24, seed=1)
    batched = predict_probs(model, tok, texts, 64, micro_batch=8, device="cpu")
    single = np.stack([predict_probs(model, tok, [t], 64, 1, "cpu")[0] for t in texts])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    np.testing.assert_allclose(batched.sum(axis=1), 1.0, atol=1e-5)
    assert batched.std(axis=0).max() > 1e-4  # rows really differ: the check above has teeth


def test_batching_defaults_by_device_and_a_set_value_wins():
    unset = HFBackendConfig(model="m")
    assert batching(unset, "cpu") == (32, 1)
    assert batching(unset, "cuda") == batching(unset, "cuda:1") == (128, 1)  # exact lengths
    given = HFBackendConfig(model="m", micro_batch_size=8, pad_to_multiple_of=4)
    assert batching(given, "cpu") == batching(given, "cuda") == (8, 4)


@pytest.mark.parametrize("model_fixture", ["qwen_model", "bert_model"])
def test_length_buckets_keep_each_rows_probabilities_and_few_shapes(model_fixture, request):
    """The actor with pad_to_multiple_of 16: every forward pass it runs over a chunk of mixed
    lengths is a multiple of 16 tokens long, and no row's probabilities move (the attention
    mask hides the extra padding; a decoder still pools on its last real token)."""
    model = request.getfixturevalue(model_fixture)
    texts = [" ".join(sample_texts(1 + i % 3, seed=i)) for i in range(60)]
    chunk = prepare_chunk(pa.table({"text": texts}), "s.parquet", 0, InputConfig(path="x"))
    # float32, not auto: on a CPU with native bf16 (AMX) auto is bfloat16, whose rounding
    # differs between shapes by ~1e-3 — the kernels' noise, not the mask's.
    exact = HFClassifier(HFBackendConfig(model=str(model), micro_batch_size=8, dtype="float32"),
                         None, "text", False)
    bucketed = HFClassifier(HFBackendConfig(model=str(model), micro_batch_size=8, dtype="float32",
                                            pad_to_multiple_of=16), None, "text", False)
    shapes = {"exact": [], "bucketed": []}
    for name, actor in (("exact", exact), ("bucketed", bucketed)):
        actor.model.register_forward_pre_hook(
            lambda _, args, kwargs, seen=shapes[name]: seen.append(tuple(kwargs["input_ids"].shape)),
            with_kwargs=True)
    a, b = exact(chunk), bucketed(chunk)
    np.testing.assert_allclose(np.array(b.column("probs").to_pylist()),
                               np.array(a.column("probs").to_pylist()), atol=1e-5)
    assert b.column("label").to_pylist() == a.column("label").to_pylist()
    lengths = {tokens for _, tokens in shapes["bucketed"]}
    assert all(tokens % 16 == 0 for tokens in lengths), lengths
    # The same micro-batches, so the buckets can only merge shapes, never add any.
    assert len(shapes["bucketed"]) == len(shapes["exact"]) == 8
    assert len(lengths) < len({tokens for _, tokens in shapes["exact"]})


def test_gpu_queue_keeps_each_rows_probabilities(qwen_model):
    """The GPU path (queued_probs, one copy back at the end) run on CPU: the rows come back
    in the sorted batches' order, and predict_probs must put each one back in its place."""
    model, tok = load_classifier(HFBackendConfig(model=str(qwen_model), max_length=64), "cpu")
    texts = sample_texts(24, seed=2)
    encoded, _ = encode_truncating(tok, texts, 64)
    batches = length_sorted_batches([len(ids) for ids in encoded], 8)
    queued, no_reps = queued_probs(model, tok, encoded, batches, "cpu")
    expected = predict_probs(model, tok, texts, 64, micro_batch=8, device="cpu")
    order = [i for batch in batches for i in batch]
    np.testing.assert_allclose(queued, expected[order], atol=1e-6)
    assert no_reps is None
    # With the head's input caught (abstain.score: distance), the representations queue too.
    with HeadInput(model) as head:
        _, queued_reps = queued_probs(model, tok, encoded, batches, "cpu", head=head)
    _, reps = predict(model, tok, encoded, 8, "cpu", represent=True)
    assert reps.shape == (24, model.config.hidden_size)
    np.testing.assert_allclose(queued_reps, reps[order], atol=1e-5)


def test_missing_pad_token_falls_back_and_truncation_applies(tmp_path):
    folder = build_qwen2_classifier(tmp_path, LABELS, drop_pad_token=True)
    model, tok = load_classifier(HFBackendConfig(model=str(folder)), "cpu")
    assert tok.pad_token == tok.eos_token and model.config.pad_token_id == tok.eos_token_id
    assert tok.pad_token_id < model.get_input_embeddings().num_embeddings
    assert tok.padding_side == "right"
    long_text = "the film was a delight " * 200
    probs = predict_probs(model, tok, [long_text, "short"], max_length=16, micro_batch=2, device="cpu")
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_actor_labels_a_prepared_chunk_and_keeps_bad_rows(qwen_model):
    texts = sample_texts(10) + [None, "", "   "]
    chunk = prepare_chunk(pa.table({"text": texts}), "s.parquet", 0, InputConfig(path="x"))
    actor = HFClassifier(HFBackendConfig(model=str(qwen_model)), None, "text", use_gpu=False)
    out = actor(chunk)
    assert out.num_rows == 13
    labels, conf, probs, errors = (out.column(c).to_pylist() for c in
                                   ("label", "confidence", "probs", "error"))
    assert all(l in LABELS for l in labels[:10]) and labels[10:] == [None] * 3
    assert errors[10:] == ["text is null", "text is empty", "text is empty"]
    for l, c, p in zip(labels[:10], conf[:10], probs[:10]):
        assert len(p) == 3 and sum(p) == pytest.approx(1.0, abs=1e-5)
        assert c == pytest.approx(max(p)) and l == LABELS[int(np.argmax(p))]
    assert out.schema.field("confidence").type == pa.float32()
    assert out.schema.field("probs").type == pa.list_(pa.float32())


def test_config_label_order_reorders_probabilities(qwen_model):
    chunk = prepare_chunk(pa.table({"text": sample_texts(6)}), "s", 0, InputConfig(path="x"))
    backend = HFBackendConfig(model=str(qwen_model))
    natural = HFClassifier(backend, None, "text", False)(chunk)
    reordered = HFClassifier(backend, LabelSet(tuple(reversed(LABELS))), "text", False)(chunk)
    assert reordered.column("label").to_pylist() == natural.column("label").to_pylist()
    for a, b in zip(natural.column("probs").to_pylist(), reordered.column("probs").to_pylist()):
        assert b == pytest.approx(list(reversed(a)))


def test_model_folder_checks_fail_before_any_row(tmp_path, qwen_model):
    with pytest.raises(ModelError, match="no model folder at"):
        check_model_folder(HFBackendConfig(model=str(tmp_path / "nope")), None)
    broken = tmp_path / "broken"
    shutil.copytree(qwen_model, broken)
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelError, match=r"incomplete, missing \['\*\.safetensors"):
        check_model_folder(HFBackendConfig(model=str(broken)), None)
    lm = build_qwen2_classifier(tmp_path / "lm", LABELS, causal_lm=True)
    with pytest.raises(ModelError, match="Qwen2ForCausalLM.*not a merged"):
        check_model_folder(HFBackendConfig(model=str(lm)), None)
    with pytest.raises(LabelError, match=r"not in the model \['spam'\]"):
        check_model_folder(HFBackendConfig(model=str(qwen_model)), LabelSet(("negative", "spam")))
    assert check_model_folder(HFBackendConfig(model=str(qwen_model)), None).labels.names == tuple(LABELS)


@pytest.mark.parametrize("model_fixture", ["qwen_model", "bert_model"])
def test_long_rows_are_cut_to_max_length_and_flagged(model_fixture, request):
    _, tok = load_classifier(HFBackendConfig(model=str(request.getfixturevalue(model_fixture))), "cpu")
    texts = ["short text", "the film was a delight " * 50, "", "a dull mess"]
    ids, truncated = encode_truncating(tok, texts, max_length=16)
    assert truncated == [False, True, False, False]
    full = tok(texts)["input_ids"]
    assert len(ids[1]) == 16 < len(full[1])
    assert ids[0] == full[0] and ids[3] == full[3]
    # Special tokens a model expects at the end (BERT's [SEP]) survive the cut.
    if full[1][-1] in tok.all_special_ids:
        assert ids[1][-1] == full[1][-1]


def test_actor_flags_truncated_rows(qwen_model):
    texts = ["short", "the film was a delight " * 100]
    chunk = prepare_chunk(pa.table({"text": texts + [""]}), "s", 0, InputConfig(path="x"))
    out = HFClassifier(HFBackendConfig(model=str(qwen_model), max_length=32), None, "text", False)(chunk)
    assert out.column("truncated").to_pylist() == [False, True, None]


def test_the_task_check_takes_a_task_not_its_name():
    # A name compares unequal to every Task: the error would blame the model folder.
    with pytest.raises(TypeError, match="takes the run's Task .*not 'single_label'"):
        check_task(HFBackendConfig(model="m"), CheckedModel(LABELS, 1.0, {}), "single_label")
