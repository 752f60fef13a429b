"""From rows to the token batches of the training loops we own (preference model, DPO, PPO) and of
the preference model's scorer: a prompt and a response tokenised with the response's start marked,
preference rows checked, split into training and held-out rows and tokenised into chosen/rejected
pairs, padding into batches, and the summed log-probability of each row's response.

`split_rows` and `row_counts` sit here beside `preference_pairs` because the preference model and
DPO read the same preference rows (records.py, "Preference rows") the same way; neither stage
imports the other. torch is imported inside the functions that need it, so a stage can import this
module at its top without loading torch.

    cai run configs/quickstart.yaml --from pm     # stages/pm.py, dpo.py and ppo.py use these
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cai.lm.base import Message
from cai.rundir import StageError
from cai.templating import encode_chat, encode_prompt

if TYPE_CHECKING:
    import torch


def encode_response(tokenizer: Any, prompt: Sequence[Message], response: str) -> list[int]:
    """The response's tokens as the chat template closes an assistant turn (end-of-turn included).

    Found as what the full conversation adds after the templated prompt; if the template rewrites
    earlier text (some strip reasoning), fall back to the response plus the EOS token. `prompt`
    must end with the user's turn: the response answers it.
    """
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError("encode_response: the prompt must be a conversation ending with a user turn")
    p_ids = encode_prompt(tokenizer, prompt)
    full = encode_chat(tokenizer, [*map(dict, prompt), {"role": "assistant", "content": response}])
    if full[: len(p_ids)] == p_ids:
        tail = full[len(p_ids):]
        # Drop whitespace the template puts after the end-of-turn token: it is not the model's.
        while tail and tokenizer.decode(tail[-1:]).strip() == "" and tail[-1] not in (tokenizer.eos_token_id,):
            tail = tail[:-1]
        return tail
    return tokenizer(response, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]


def encode_pair(tokenizer: Any, prompt: Sequence[Message], response: str, max_length: int) -> tuple[list[int], int]:
    """(ids, response_start): prompt then response, the prompt cut from the left and then the
    response from the right when the whole is longer than `max_length`."""
    p = encode_prompt(tokenizer, prompt)
    r = encode_response(tokenizer, prompt, response)
    if len(p) + len(r) > max_length:
        keep_p = max(max_length // 2, max_length - len(r))
        p = p[-keep_p:]
        r = r[: max_length - len(p)]
    return p + r, len(p)


def split_rows(rows: Sequence[dict[str, Any]], stage: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows to train on (split "train") and to evaluate on (split "eval"), leaving out rows
    whose `status` is not "ok" (abstained or failed AI feedback carries no label). A StageError
    when nothing is left to train on."""
    usable = [r for r in rows if r.get("status", "ok") == "ok"]
    train_rows = [r for r in usable if r.get("split") == "train"]
    if not train_rows:
        raise StageError(f"{stage}: none of the {len(rows)} preference rows is usable for training (split 'train', "
                         "status 'ok'); run the preferences stage first and check preferences.eval_fraction < 1")
    return train_rows, [r for r in usable if r.get("split") == "eval"]


def row_counts(rows: Sequence[dict[str, Any]], train_rows: Sequence[dict[str, Any]],
               eval_rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Manifest counts of a preference-trained stage."""
    counts = {"rows": len(rows), "skipped_rows": len(rows) - len(train_rows) - len(eval_rows),
              "train_rows": len(train_rows), "eval_rows": len(eval_rows)}
    for src in ("ai", "human"):
        counts[f"eval_rows_{src}"] = sum(r.get("label_source") == src for r in eval_rows)
    return counts


def preference_pairs(tokenizer: Any, rows: Sequence[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Tokenise preference rows (see records.py) for the preference model and DPO: per row
    `chosen`/`rejected` as (ids, response_start) from `encode_pair`, `p` = P(chosen is better) and
    `source` (the label source). A malformed row is a ValueError naming its record and field."""
    out = []
    for n, row in enumerate(rows):
        where = f"preference row {row.get('record_id', f'#{n}')}"
        prompt = row.get("prompt")
        if not (isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                           for m in prompt) and prompt[-1].get("role") == "user"):
            raise ValueError(f"{where}: 'prompt' must be a list of {{role, content}} messages ending with a user turn")
        texts = []
        for key in ("chosen", "rejected"):
            msgs = row.get(key)
            if not (isinstance(msgs, list) and len(msgs) == 1 and isinstance(msgs[0], dict)
                    and msgs[0].get("role") == "assistant" and isinstance(msgs[0].get("content"), str)):
                raise ValueError(f"{where}: '{key}' must be one assistant message [{{role: assistant, content}}]")
            texts.append(msgs[0]["content"])
        p = row.get("p_chosen")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"{where}: 'p_chosen' must be a probability in [0, 1], got {p!r}")
        out.append({"chosen": encode_pair(tokenizer, prompt, texts[0], max_length),
                    "rejected": encode_pair(tokenizer, prompt, texts[1], max_length),
                    "p": float(p), "source": row.get("label_source", "ai")})
    return out


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, starts: Sequence[int] | None = None,
              left: bool = False) -> dict[str, torch.Tensor]:
    """Pad token lists into `input_ids`, `attention_mask` and (with `starts`) `response_mask`,
    which is 1 on the tokens from each row's response start to its end."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    resp = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        off = width - len(s) if left else 0
        ids[i, off: off + len(s)] = torch.tensor(list(s), dtype=torch.long)
        att[i, off: off + len(s)] = 1
        if starts is not None:
            resp[i, off + starts[i]: off + len(s)] = 1
    out = {"input_ids": ids, "attention_mask": att}
    if starts is not None:
        out["response_mask"] = resp
    return out


def sequence_logprob(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probability of each row's response tokens (rows right-padded)."""
    import torch

    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1]
    labels = batch["input_ids"][:, 1:]
    mask = batch["response_mask"][:, 1:].to(logits.device)
    logp = torch.gather(torch.log_softmax(logits.float(), -1), -1, labels.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)
