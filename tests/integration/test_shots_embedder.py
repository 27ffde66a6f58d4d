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


def test_the_pool_is_embedded_once_for_the_job_and_every_actor_gets_those_vectors(ray_cluster, tmp_path):
    """backend.prompt.shots with select: similar: the driver starts one Ray task for the
    pool's vectors, and actors (here a remote task standing in for one on another worker)
    fetch them from the object store: the embedder's own vectors."""
    import ray

    from clsjob.backends.vllm_prompt import pool_vectors_once
    from clsjob.config import ShotsConfig, StorageConfig
    from clsjob.shots import Pool

    folder = extract_minilm(tmp_path / "minilm")
    texts = tuple(t for topic in POOL.values() for t in topic)
    pool = Pool(texts, tuple(label for label, topic in POOL.items() for _ in topic))
    shots = ShotsConfig(pool="unused", select="similar", embedder=str(folder))
    ref = pool_vectors_once(shots, pool, StorageConfig())
    assert isinstance(ref, ray.ObjectRef)

    @ray.remote(num_cpus=0)
    def fetched(holder: list):  # a ref inside an argument, as in an actor's constructor kwargs
        return ray.get(holder[0])

    vectors = ray.get(fetched.remote([ref]))
    np.testing.assert_allclose(vectors, Embedder(str(folder))(list(texts)), atol=1e-5)
    assert vectors.shape == (12, 384)
