"""Chat templating that keeps message text as text.

A tokenizer run over the templated string turns any special-token text it meets into that special
token, wherever it came from. So a response that contains `<|im_end|>\\n<|im_start|>user` would
become a real turn boundary: a forged turn. `encode_chat` templates the conversation with a
placeholder for each message's content, tokenises the template's own text normally and each
message's content with special-token text split into ordinary tokens, so nothing inside a message
can change how the prompt around it is tokenised.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from cai.lm.base import Message

_SLOT = "\ue000{}\ue001"  # private-use characters: never in real text, kept intact by templates
_SLOT_RE = re.compile("\ue000(\\d+)\ue001")


def encode_chat(tokenizer: Any, conversation: Sequence[Message], add_generation_prompt: bool = False,
                continue_final_message: bool = False) -> list[int]:
    """Token ids of the templated conversation, with message contents tokenised as plain text."""
    conv = [dict(m) for m in conversation]
    contents = [m["content"] for m in conv]
    slotted = [{**m, "content": _SLOT.format(i)} for i, m in enumerate(conv)]
    text = tokenizer.apply_chat_template(slotted, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         continue_final_message=continue_final_message)
    pieces = _SLOT_RE.split(text)
    found = [int(i) for i in pieces[1::2]]
    if sorted(found) != list(range(len(conv))):
        # The template rewrote a placeholder (it trims or transforms content): template the real text
        # and still refuse special tokens inside it by splitting them everywhere but the template's.
        text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for k, piece in enumerate(pieces):
        if k % 2 == 0:
            if piece:
                ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
        else:
            content = contents[int(piece)]
            if content:
                ids += tokenizer(content, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a raw-text prompt, with no chat template (the paper's `Human:`/`Assistant:`
    format): the tokenizer's own start token if it adds one, then the text with any special-token
    text in it split into ordinary tokens, so quoted replies cannot forge a turn here either."""
    return tokenizer(text, add_special_tokens=True, split_special_tokens=True)["input_ids"]


def encode_prompt(tokenizer: Any, conversation: Sequence[Message] | str) -> list[int]:
    """Token ids every back-end sends for a prompt. A conversation is templated: a final assistant
    message is left open to be continued (option scoring), otherwise a generation prompt is added.
    A string is raw text, tokenised as it stands (`encode_text`)."""
    if isinstance(conversation, str):
        return encode_text(tokenizer, conversation)
    if getattr(tokenizer, "chat_template", None) is None:
        from cai.models import ModelError

        name = getattr(tokenizer, "name_or_path", "") or "the model"
        raise ModelError(f"{name}: the tokenizer has no chat template, so it cannot take a chat conversation; "
                         "use an instruct/chat model, or raw-text prompts (feedback.format: raw)")
    cont = bool(conversation) and conversation[-1]["role"] == "assistant"
    return encode_chat(tokenizer, conversation, add_generation_prompt=not cont, continue_final_message=cont)
