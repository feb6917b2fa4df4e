"""Chat-format encoding with response masks, padding, and batched greedy generation.

Own small implementation (the testbed stays apart from the library): a prompt is one user
turn rendered by the model's chat template with the generation prompt; the response tokens are
the full user+assistant conversation's tokens after the prompt tokens (they include the
closing end-of-turn token, so a trained model learns to stop).
"""

from __future__ import annotations

from typing import Dict, List, Sequence


def _ids(out) -> List[int]:
    if hasattr(out, "keys"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], list):
        out = out[0]
    return list(out)


def prompt_ids(tokenizer, prompt: str) -> List[int]:
    return _ids(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              tokenize=True))


def encode(tokenizer, prompt: str, response: str) -> Dict[str, List[int]]:
    """``{"input_ids", "response_mask"}`` for one (prompt, response) pair."""
    p_ids = prompt_ids(tokenizer, prompt)
    conv = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    full = _ids(tokenizer.apply_chat_template(conv, tokenize=True))
    if full[: len(p_ids)] != p_ids:
        raise ValueError("chat template does not render the prompt as a prefix of the conversation")
    # the template ends the assistant turn with "<|im_end|>\n"; keep <|im_end|>, drop the newline
    r_ids = full[len(p_ids):]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if end in r_ids:
        r_ids = r_ids[: r_ids.index(end) + 1]
    return {"input_ids": p_ids + r_ids, "response_mask": [0] * len(p_ids) + [1] * len(r_ids)}


def collate(encoded: Sequence[Dict[str, List[int]]], pad_id: int):
    import torch

    width = max(len(e["input_ids"]) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    response = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        attention[row, :n] = 1
        response[row, :n] = torch.tensor(e["response_mask"])
    return {"input_ids": ids, "attention_mask": attention, "response_mask": response}


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 32,
             progress=None) -> List[str]:
    """Greedy answers, batched with left padding; prompts sorted by length to waste little padding."""
    import torch

    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    answers: List[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=[end, tokenizer.eos_token_id], pad_token_id=pad)
        for row, i in enumerate(chunk):
            answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
        if progress:
            progress(len(chunk))
    return answers
