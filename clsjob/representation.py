"""A row's representation as its classifier sees it: what the head turns into logits — the
input of the last linear layer with one output per label (BERT's `classifier` after its
pooler, RoBERTa's and MPNet's `classifier.out_proj`, a decoder's `score`), at the position the
model reads its logits from (a decoder: the last token that is not padding).

Caught by a forward hook during the forward pass that gives the probabilities, so measuring
how far a row lies from the training rows (`abstain.score: distance`, evaluation/distance.py)
costs no second pass over the rows. The same code serves the fine-tune (the index of training
rows, under LoRA's wrappers) and the `hf` back end (the merged folder), so both measure in one
space."""
from __future__ import annotations

import torch


class HeadInput:
    """`with HeadInput(model) as head:` each forward of `model` leaves its rows'
    representations in `head.pooled(input_ids)`."""

    def __init__(self, model):
        self.model = model
        n = model.config.num_labels
        # The head's last layer, and any copy of it a wrapper holds (peft's modules_to_save
        # keeps the original beside the trained one): the last of them to run is the head.
        self.layers = [m for m in model.modules()
                       if isinstance(m, torch.nn.Linear) and m.out_features == n]
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no linear layer with one output per "
                             f"label ({n}) to read a representation from")
        self.caught: torch.Tensor | None = None
        self.handles: list = []

    def __enter__(self) -> "HeadInput":
        self.handles = [layer.register_forward_hook(self._catch) for layer in self.layers]
        return self

    def __exit__(self, *_) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _catch(self, module, args, output) -> None:
        self.caught = args[0]

    def pooled(self, input_ids: torch.Tensor) -> torch.Tensor:
        """rows x hidden, float32, of the last forward. A decoder's head runs on every token
        and the model keeps the logits of the rightmost token that is not its pad token (as
        transformers' *ForSequenceClassification does); an encoder's head sees one vector a
        row already."""
        caught = self.caught
        if caught is None:
            raise RuntimeError("no forward ran through the head since HeadInput was entered")
        if caught.dim() == 3:
            pad = self.model.config.pad_token_id
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
            last = ((input_ids != pad).int() * positions).argmax(-1) if pad is not None \
                else torch.full((input_ids.shape[0],), input_ids.shape[-1] - 1, device=input_ids.device)
            caught = caught[torch.arange(caught.shape[0], device=caught.device), last.to(caught.device)]
        return caught.float()
