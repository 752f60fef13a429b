"""Pieces shared by the training loops we own (preference model, DPO, PPO): tokenising a prompt
and a response with the response marked, padding, deterministic batch order, the optimiser and
schedule, checkpoints that resume with the same data order and RNG state, and a metrics log.
`preference_pairs` turns preference rows into chosen/rejected token sequences for the preference
model and DPO.

The loops themselves live in their stage files (`stages/pm.py`, `stages/dpo.py`, `stages/ppo.py`),
each short enough to read top to bottom. Device placement, mixed precision and the spread over
processes go through `accelerate`, so the same loops run under `accelerate launch` (DDP, FSDP,
DeepSpeed ZeRO; configs in `configs/accelerate/`):

    accelerate launch --config_file configs/accelerate/ddp.yaml -m cai.cli run configs/quickstart.yaml --from sft

A config's `batch_size` is the global batch: each of the N processes takes its contiguous share
(`per_process`, `local_rows`) of every step's rows, `accelerate` averages the gradients, and losses
are normalised so that a step is the one a single process would take on the whole batch. Only the
main process writes checkpoints, metrics and the final model.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from cai.lm.base import Message
from cai.templating import encode_chat, encode_prompt

T = TypeVar("T")


# ---- tokenisation ---------------------------------------------------------------------------


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
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1]
    labels = batch["input_ids"][:, 1:]
    mask = batch["response_mask"][:, 1:].to(logits.device)
    logp = torch.gather(torch.log_softmax(logits.float(), -1), -1, labels.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


# ---- data order -----------------------------------------------------------------------------


def batch_order(n: int, batch_size: int, epochs: float, seed: int) -> list[list[int]]:
    """Every optimiser step's row indices for the whole run, from a seeded shuffle per epoch, so
    step k has the same rows however often the run was stopped and resumed."""
    if n == 0:
        return []
    total = max(1, math.ceil(n * epochs / batch_size))
    order: list[int] = []
    epoch = 0
    while len(order) < total * batch_size:
        perm = list(range(n))
        random.Random(f"{seed}:{epoch}").shuffle(perm)
        order += perm
        epoch += 1
    return [order[i * batch_size: (i + 1) * batch_size] for i in range(total)]


def steps_for(n: int, batch_size: int, epochs: float, max_steps: int, seed: int) -> list[list[int]]:
    """`batch_order`, cut to `max_steps` when that is positive."""
    steps = batch_order(n, batch_size, epochs, seed)
    return steps[:max_steps] if max_steps > 0 else steps


# ---- optimiser ------------------------------------------------------------------------------


def optimizer_and_schedule(params: Any, lr: float, total_steps: int, warmup_ratio: float,
                           weight_decay: float = 0.0) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW with linear warm-up then cosine decay to 10% of `lr`."""
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay)
    warm = max(0, round(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        frac = (step - warm) / max(1, total_steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def accelerator(bf16: bool, device: str = "auto") -> Any:
    """An `accelerate.Accelerator` with bf16 autocast where the hardware has it. Under `accelerate
    launch` it spans the launched processes, with the launch config's DDP / FSDP / DeepSpeed setup."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from cai.models import cpu_has_bf16, pick_device

    dev = pick_device(device)
    ok = torch.cuda.is_bf16_supported() if dev.startswith("cuda") else cpu_has_bf16()
    distributed_state(device)
    # accelerate keeps one process-wide state and refuses a second Accelerator with another
    # precision; stages run one after another in a process (a pipeline, the tests), each with its
    # own setting. The distributed part (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision="bf16" if bf16 and ok else "no", cpu=dev == "cpu")


# ---- many processes -------------------------------------------------------------------------


def distributed_state(device: str = "auto") -> Any:
    """accelerate's process-wide `PartialState`. On a machine without GPUs (`device` resolving to
    the CPU) it must be created with cpu=True, or processes started by `accelerate launch` would
    each think they are alone; with it they form one gloo group."""
    from accelerate import PartialState

    from cai.models import pick_device

    return PartialState(cpu=pick_device(device) == "cpu")


class StageBarrier:
    """A barrier between the processes of `accelerate launch` for the pipeline's stage loop, on a
    gloo group of its own with a time limit of days: processes wait there while the main one runs
    a data stage, which can take hours with a large model, longer than the default group allows
    (30 minutes, after which NCCL's watchdog would end the run). Every process must create it, at
    the same point (creating a group is collective)."""

    def __init__(self, device: str = "auto"):
        import datetime

        import torch.distributed as dist

        self.state = distributed_state(device)
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))

    @property
    def is_main_process(self) -> bool:
        return self.state.is_main_process

    def wait(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)


def process_device(device: str = "auto") -> str:
    """The device this process loads models onto: `device` itself, except that processes started
    by `accelerate launch` on GPUs each take their own GPU."""
    state = distributed_state(device)
    return str(state.device) if state.device.type != "cpu" else device


def per_process(batch_size: int, acc: Any, field: str) -> int:
    """The rows each process takes of a global batch of `batch_size`; a ValueError naming `field`
    when the batch does not split evenly over the processes (shares must be equal for the averaged
    gradient to be the whole batch's)."""
    n = acc.num_processes
    if batch_size < n or batch_size % n:
        raise ValueError(f"{field} ({batch_size}) is the global batch, split over {n} processes: it must be "
                         f"a multiple of {n}")
    return batch_size // n


def local_rows(rows: Sequence[T], acc: Any) -> Sequence[T]:
    """This process's contiguous share of a global batch (whose length `per_process` checked)."""
    k = len(rows) // acc.num_processes
    return rows[acc.process_index * k: (acc.process_index + 1) * k]


def padded_share(items: Sequence[T], acc: Any) -> tuple[list[T], int]:
    """This process's share of `items` for scoring, padded by repeating an item so every process
    runs the same number of forward passes (DDP, FSDP and ZeRO-3 forwards are collective); returns
    (share, how many of it are real). `gather_list` of the shares, cut to the real ones, restores
    the order of `items`."""
    n = acc.num_processes
    k = math.ceil(len(items) / n) if items else 0
    share = list(items[acc.process_index * k: (acc.process_index + 1) * k])
    real = len(share)
    if items:
        share += [items[-1]] * (k - real)
    return share, real


def gather_list(items: list[T], acc: Any) -> list[T]:
    """Every process's list, concatenated in process order (picklable items)."""
    if acc.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return gather_object(list(items))


def gather_padded(values: list[T], real: int, acc: Any) -> list[T]:
    """`gather_list` of `padded_share` results, with each process's padding dropped first."""
    return [v for part in gather_list([values[:real]], acc) for v in part]


def sharded(acc: Any) -> bool:
    """Whether parameters or optimiser state are split over processes (FSDP, DeepSpeed), so that
    saving needs every process and the whole state only exists gathered."""
    from accelerate.utils import DistributedType

    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def check_grad_accum(acc: Any, grad_accum: int, field: str) -> None:
    """Our loops accumulate by calling backward per micro-batch; a DeepSpeed engine steps inside
    every backward instead, so accumulation there would step per micro-batch."""
    from accelerate.utils import DistributedType

    if grad_accum > 1 and acc.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError(f"{field} > 1 is not supported under DeepSpeed (its engine steps on every backward); "
                         "raise the batch size instead")


def main_process(acc: Any | None) -> bool:
    return acc is None or acc.is_main_process


def barrier(acc: Any | None) -> None:
    if acc is not None:
        acc.wait_for_everyone()


class Joint(torch.nn.Module):
    """Modules trained together as one `nn.Module` whose forward is `fn(self, *args, **kwargs)`.

    `accelerate.prepare` wraps one module per model (DDP, FSDP, a DeepSpeed engine), and DDP
    reduces the gradients of what runs inside that module's forward only: the preference model's
    body and score head, or the PPO policy and its value head, must be called through one forward.
    `config` and `_no_split_modules` are the first module's, which FSDP's auto-wrap and DeepSpeed's
    "auto" settings read."""

    def __init__(self, fn: Callable[..., Any], **modules: torch.nn.Module):
        super().__init__()
        self.fn = fn
        for name, module in modules.items():
            self.add_module(name, module)
        first = next(iter(modules.values()))
        self.config = getattr(first, "config", None)
        self._no_split_modules = getattr(first, "_no_split_modules", None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(self, *args, **kwargs)


def prepare(acc: Any, micro_batch: int, *objs: Any) -> Any:
    """`acc.prepare(*objs)`, telling DeepSpeed each process's micro-batch size (rows per backward),
    which it would otherwise read from a DataLoader; our loops index their rows themselves."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.DEEPSPEED:
        acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch
    return acc.prepare(*objs)


def full_state_dict(acc: Any, model: Any, prefix: str = "") -> dict[str, torch.Tensor] | None:
    """The whole state dict of a prepared model gathered from its shards (FSDP, ZeRO-3): every
    process must call it. Keys under `prefix` only, with the prefix dropped. None where each
    process already holds the whole model (one process, DDP): save the unwrapped model as it is."""
    if not sharded(acc):
        return None
    sd = acc.get_state_dict(model)
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# ---- checkpoints ----------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_dir: Path, step: int, modules: dict[str, Any], extra: dict[str, Any],
                    acc: Any | None = None) -> Path:
    """Write `step-<n>/` (module and optimiser state dicts, RNG state, `extra`) through a temporary
    folder renamed into place, then delete older checkpoints. Model weights go in safetensors.

    With `acc`, every process must call it: the main process writes (modules are unwrapped first),
    and where state is sharded (FSDP, DeepSpeed) the prepared models and optimisers go through
    `acc.save_state` (each process writes its shard) and only the other entries are written here."""
    from safetensors.torch import save_file

    final = ckpt_dir / f"step-{step}"
    tmp = ckpt_dir / f".step-{step}.tmp"
    main = main_process(acc)
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(acc)
    split = acc is not None and sharded(acc)
    if split:
        acc.save_state(str(tmp / "accelerate"))
    if main:
        for name, obj in modules.items():
            if isinstance(obj, torch.nn.Module):
                if split:
                    continue
                obj = acc.unwrap_model(obj) if acc is not None else obj
                sd = {k: v.detach().contiguous().cpu() for k, v in _trained_state(obj).items()}
                save_file(_untie(sd), str(tmp / f"{name}.safetensors"))
            elif split and isinstance(obj, torch.optim.Optimizer):
                continue
            else:  # optimiser / scheduler state: plain tensors and numbers
                torch.save(obj.state_dict(), tmp / f"{name}.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **extra}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in ckpt_dir.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    barrier(acc)
    return final


def _trained_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of a module: its whole state, or for a peft model (LoRA) only the
    trainable adapter weights: its base weights are frozen and are reloaded from the model directory."""
    if hasattr(module, "peft_config"):
        return {k: p for k, p in module.named_parameters() if p.requires_grad}
    return module.state_dict()


def _untie(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): give each its own copy."""
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = [p for p in ckpt_dir.glob("step-*") if (p / "state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def load_checkpoint(path: Path, modules: dict[str, Any], acc: Any | None = None) -> dict[str, Any]:
    """Restore what `save_checkpoint` wrote into `modules` and the RNG; returns its state.json.
    Every process loads (with `acc`, into the unwrapped modules, or through `acc.load_state` where
    the checkpoint holds sharded state)."""
    from safetensors.torch import load_file

    split = (path / "accelerate").is_dir()
    if split:
        if acc is None:
            raise ValueError(f"{path}: a sharded (FSDP/DeepSpeed) checkpoint; resume it under the same accelerate launch")
        acc.load_state(str(path / "accelerate"))
    for name, obj in modules.items():
        if isinstance(obj, torch.nn.Module):
            if split:
                continue
            obj = acc.unwrap_model(obj) if acc is not None else obj
            # Tied weights are saved under both names (see _untie); strict loading catches a
            # checkpoint of another model or a prefix mismatch (a wrapper saved, a module loaded).
            sd = load_file(str(path / f"{name}.safetensors"))
            if hasattr(obj, "peft_config"):  # adapters only (see _trained_state), all of them
                expected = set(_trained_state(obj))
                if set(sd) != expected:
                    raise ValueError(f"{path / f'{name}.safetensors'}: its adapter weights do not match the model's "
                                     f"({len(set(sd) ^ expected)} names differ)")
                obj.load_state_dict(sd, strict=False)
            else:
                obj.load_state_dict(sd, strict=True)
        elif split and isinstance(obj, torch.optim.Optimizer):
            continue
        else:
            obj.load_state_dict(torch.load(path / f"{name}.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "state.json").read_text())


def resume(ckpt_dir: Path, modules: dict[str, Any], plan: str, acc: Any | None = None) -> tuple[int, Path | None]:
    """Restore the newest checkpoint into `modules` if it was saved with `extra={"plan": plan}`
    (a hash of what fixes the step sequence: config, seed, data) and return (its step, its path).
    A checkpoint of another plan would continue a different schedule on different rows, so it is
    removed and the run starts afresh: (0, None). With `acc` every process must call it."""
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        return 0, None
    same = json.loads((path / "state.json").read_text()).get("plan") == plan
    if not same:
        barrier(acc)  # every process has looked before the main one deletes
        if main_process(acc):
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        barrier(acc)
        return 0, None
    return int(load_checkpoint(path, modules, acc)["step"]), path


# ---- metrics --------------------------------------------------------------------------------


class MetricsLog:
    """Per-step metrics appended to `<stage>/metrics.jsonl`, and to TensorBoard / W&B / trackio
    when named in `report_to` (imported only then). With `main` False (a process other than the
    main one under `accelerate launch`) it writes nothing and reports to nothing."""

    def __init__(self, path: Path, report_to: Sequence[str] = (), run_name: str = "cai", config: Any = None,
                 main: bool = True):
        self.path = path
        self.main = main
        self.sinks: list[Any] = []
        for name in report_to if main else ():
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self.sinks.append(("tensorboard", SummaryWriter(str(path.parent / "tensorboard"))))
            elif name == "wandb":
                import wandb

                self.sinks.append(("wandb", wandb.init(project="constitutional-ai", name=run_name, config=config)))
            elif name == "trackio":
                import trackio

                self.sinks.append(("trackio", trackio.init(project="constitutional-ai", name=run_name, config=config)))
            elif name != "none":
                raise ValueError(f"report_to: unknown tracker '{name}' (use tensorboard, wandb or trackio)")

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so no step appears twice."""
        if not self.main or not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.main:
            return
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for kind, sink in self.sinks:
            if kind == "tensorboard":
                for k, v in metrics.items():
                    sink.add_scalar(k, float(v), step)
            else:
                sink.log({k: float(v) for k, v in metrics.items()}, step=step)

    def rows(self) -> list[dict[str, float]]:
        if not self.path.exists():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]

    def close(self) -> None:
        for kind, sink in self.sinks:
            if kind == "tensorboard":
                sink.close()
            elif kind == "wandb":
                sink.finish()


def save_model(model: Any, tokenizer: Any, out: Path, state_dict: dict[str, Any] | None = None) -> None:
    """Save weights (safetensors) and tokenizer through a temporary folder renamed into place;
    `state_dict` (see `full_state_dict`) replaces the model's own where that is sharded. Called by
    the main process only."""
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
