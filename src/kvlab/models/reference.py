"""The reference kvlab is checked against: greedy decoding with plain transformers (its own
``DynamicCache``, SDPA attention), left padding and explicit positions, on the model's device."""

from __future__ import annotations

from typing import Any

import torch

from kvlab.models.shaping import left_pad, positions_from_valid


@torch.no_grad()
def transformers_greedy(model: Any, ids: list[list[int]], new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [B, new_tokens], logits [B, new_tokens, V] float32)`` of greedy decoding without kvlab."""
    device = next(model.parameters()).device
    input_ids, valid = (t.to(device) for t in left_pad(ids))
    positions = positions_from_valid(valid)
    mask = valid.long()
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
    logits, cache = [out.logits[:, -1]], out.past_key_values
    token, pos = out.logits[:, -1].argmax(-1), positions[:, -1]
    tokens = [token]
    for _ in range(new_tokens - 1):
        mask = torch.cat([mask, torch.ones(len(ids), 1, dtype=torch.long, device=device)], 1)
        pos = pos + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=pos[:, None],
                    past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1)
        logits.append(out.logits[:, -1])
        tokens.append(token)
    return torch.stack(tokens, 1), torch.stack(logits, 1).float()
