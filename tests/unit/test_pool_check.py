"""vllm_pool's driver check against vLLM's way of picking a model class, on made-up registries
(tests/integration/test_vllm.py checks it against the installed vLLM's)."""
from clsjob.backends.vllm_pool import pooling_refusal

# vLLM 0.32's order of architecture suffixes (vllm.config.model.iter_architecture_defaults).
SUFFIXES = ["ForCausalLM", "ForConditionalGeneration", "ChatModel", "LMHeadModel",
            "ForTextEncoding", "EmbeddingModel", "ForSequenceClassification",
            "ForTokenClassification", "ClassificationModel", "ForRewardModeling", "RewardModel",
            "Model"]


class Compatible:
    @staticmethod
    def is_backend_compatible():
        return True


class Incompatible:
    @staticmethod
    def is_backend_compatible():
        return False


def test_an_implemented_classifier_or_a_causal_lm_to_convert_is_served():
    assert pooling_refusal("BertForSequenceClassification", {"BertForSequenceClassification"},
                           SUFFIXES, None) is None
    # The causal LM comes before the bare body in vLLM's order: Qwen2 and Llama convert.
    assert pooling_refusal("Qwen2ForSequenceClassification", {"Qwen2Model", "Qwen2ForCausalLM"},
                           SUFFIXES, Incompatible) is None


def test_a_bare_body_is_refused_naming_the_causal_lm_it_lacks():
    why = pooling_refusal("Gemma3TextForSequenceClassification",
                          {"Gemma3TextModel", "Gemma3ForCausalLM"}, SUFFIXES, Compatible)
    assert why == ("it has no Gemma3TextForCausalLM to convert, only the bare body "
                   "Gemma3TextModel, whose weights lack the merged folder's 'model.' prefix")


def test_an_unknown_family_falls_back_to_transformers_only_where_that_class_can():
    assert pooling_refusal("NewForSequenceClassification", set(), SUFFIXES, Compatible) is None
    refused = ("it implements neither NewForSequenceClassification nor a causal LM of its "
               "family to convert")
    assert pooling_refusal("NewForSequenceClassification", set(), SUFFIXES, Incompatible) == refused
    # Not a transformers class either.
    assert pooling_refusal("NewForSequenceClassification", set(), SUFFIXES, None) == refused
