"""The shots embedder on a real encoder (all-MiniLM-L6-v2, shipped by a package the project
installs): its vectors are the mean pooling the model was trained with, and a row's similar
shots are its true neighbours."""
import numpy as np
import torch

from clsjob.demo import extract_minilm
from clsjob.embedder import Embedder
from clsjob.shots import similar_shots

POOL = {
    "password": ["How do I reset my password?", "I forgot my login password.",
                 "My password does not work any more.", "Can I change the password on my account?"],
    "lost_card": ["I lost my card yesterday.", "My card was stolen on the train.",
                  "Someone took my wallet with my bank card.", "Please block my missing card."],
    "exchange": ["What exchange rate do you use for euros?", "How much is a dollar in pounds today?",
                 "Why was the currency conversion rate so bad?", "Do you charge for converting currency?"],
}
ROWS = {"password": "I can't remember the password to sign in.",
        "lost_card": "My debit card has gone missing.",
        "exchange": "Is the rate for changing yen to euros fair?"}


def test_similar_shots_from_minilm_are_a_rows_true_neighbours(tmp_path):
    folder = extract_minilm(tmp_path / "minilm")
    embed = Embedder(str(folder))
    texts = [t for topic in POOL.values() for t in topic]
    labels = [label for label, topic in POOL.items() for _ in topic]
    pool = embed(texts)
    # The same vectors as mean pooling computed here, on one padded batch in pool order.
    batch = embed.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = embed.model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    np.testing.assert_allclose(pool, ((hidden * mask).sum(1) / mask.sum(1)).numpy(), atol=1e-4)

    rows = list(ROWS.values())
    shots = similar_shots(embed(rows), pool, rows, texts, labels, k=4)
    for topic, chosen in zip(ROWS, shots):
        assert {labels[j] for j in chosen} == {topic}, (topic, [texts[j] for j in chosen])
    # A pool row labelled as a row is not its own shot: its topic's other three are.
    own = similar_shots(embed(texts[:1]), pool, texts[:1], texts, labels, k=3)[0]
    assert sorted(own) == [1, 2, 3]
