import pytest

from clsjob.config import LabelSpec
from clsjob.labels import LabelError, LabelSet, resolve_model_labels


def test_names_ids_and_descriptions():
    labels = LabelSet.from_specs([LabelSpec(name="neg", description="bad"), LabelSpec(name="pos")])
    assert labels.names == ("neg", "pos") and labels.descriptions == ("bad", None)
    assert labels.id_of("pos") == 1 and "neg" in labels and "zzz" not in labels
    assert labels.id2label() == {0: "neg", 1: "pos"}
    assert labels.label2id() == {"neg": 0, "pos": 1}


def test_from_id2label_accepts_string_ids_and_sorts():
    assert LabelSet.from_id2label({"1": "b", "0": "a", "2": "c"}).names == ("a", "b", "c")
    with pytest.raises(LabelError, match="not 0..1"):
        LabelSet.from_id2label({0: "a", 2: "b"})


def test_malformed_sets_are_rejected():
    with pytest.raises(LabelError, match="empty"):
        LabelSet(())
    with pytest.raises(LabelError, match=r"duplicate label names: \['a'\]"):
        LabelSet(("a", "b", "a"))


def test_config_order_is_kept_and_mapped_to_model_columns():
    model = LabelSet(("neg", "neu", "pos"))
    labels, columns = resolve_model_labels(LabelSet(("pos", "neg", "neu")), model)
    assert labels.names == ("pos", "neg", "neu")
    assert columns == [2, 0, 1]
    assert resolve_model_labels(None, model) == (model, [0, 1, 2])


def test_mismatch_names_both_sides():
    with pytest.raises(LabelError, match=r"not in the model \['spam'\], not in the config \['neu'\]"):
        resolve_model_labels(LabelSet(("neg", "pos", "spam")), LabelSet(("neg", "neu", "pos")))
