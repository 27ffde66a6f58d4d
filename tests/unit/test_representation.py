"""A row's representation (clsjob/representation.py): the input of the head's last layer, at
the position the model reads its logits from, for every family users bring."""
import numpy as np
import pytest
import torch

from clsjob.backends.hf import encode_truncating, load_classifier, predict
from clsjob.config import HFBackendConfig
from clsjob.representation import HeadInput
from helpers import LABELS, sample_texts
from tiny_models import build_family_classifier


# Encoders whose head is one layer, two layers, or a pooler and a layer; decoders that read
# the last token, one of them padding with its end-of-text token.
@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "qwen2", "llama-nopad"])
def test_the_representation_is_what_the_head_turns_into_the_logits(family, tmp_path):
    folder = build_family_classifier(tmp_path / family, family, LABELS)
    model, tok = load_classifier(HFBackendConfig(model=str(folder)), "cpu")
    texts = sample_texts(12, seed=4)
    encoded, _ = encode_truncating(tok, texts, 64)
    assert len({len(ids) for ids in encoded}) > 3  # micro-batches pad their shorter rows
    probs, reps = predict(model, tok, encoded, 4, "cpu", represent=True)
    assert reps.shape[0] == 12 and reps.dtype == np.float32
    # The head's last layer on the representation gives the model's own logits.
    last = HeadInput(model).layers[-1]
    with torch.inference_mode():
        logits = last(torch.from_numpy(reps)).float()
    np.testing.assert_allclose(torch.softmax(logits, -1).numpy(), probs, atol=1e-5)
    # Padding does not reach it: each row alone gives the same vector.
    alone = np.concatenate([predict(model, tok, [ids], 1, "cpu", represent=True)[1] for ids in encoded])
    np.testing.assert_allclose(reps, alone, atol=1e-4)


def test_without_a_forward_there_is_nothing_to_read(tmp_path):
    model, _ = load_classifier(HFBackendConfig(model=str(
        build_family_classifier(tmp_path / "bert", "bert", LABELS))), "cpu")
    with HeadInput(model) as head, pytest.raises(RuntimeError, match="no forward"):
        head.pooled(torch.zeros((1, 3), dtype=torch.long))
    assert not any(layer._forward_hooks for layer in head.layers)  # the hooks are gone
