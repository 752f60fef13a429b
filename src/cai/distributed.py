"""Running the training loops we own over many processes: the `accelerate` objects, each process's
share of a batch, gathering results back in order, and saving whole weights from sharded ones.

Device placement, mixed precision and the spread over processes go through `accelerate`, so the
loops in `stages/pm.py`, `stages/dpo.py` and `stages/ppo.py` (and TRL's in `stages/sft.py`) run
under `accelerate launch` (DDP, FSDP, DeepSpeed ZeRO; configs in `configs/accelerate/`):

    accelerate launch --config_file configs/accelerate/ddp.yaml -m cai.cli run configs/quickstart.yaml --from sft

A config's `batch_size` is the global batch: each of the N processes takes its contiguous share
(`per_process`, `local_rows`) of every step's rows, `accelerate` averages the gradients, and losses
are normalised so that a step is the one a single process would take on the whole batch. Only the
main process writes checkpoints, metrics and the final model (`main_process`). The pipeline's
`StageBarrier` keeps the other processes waiting while the main one runs a data stage.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def accelerator(bf16: bool, device: str = "auto") -> Any:
    """An `accelerate.Accelerator` with bf16 autocast where the hardware runs it fast (on a CPU,
    `models.bf16_fast`). Under `accelerate launch` it spans the launched processes, with the
    launch config's DDP / FSDP / DeepSpeed setup."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from cai.models import bf16_fast, pick_device

    dev = pick_device(device)
    ok = bf16_fast(dev)
    distributed_state(device)
    # accelerate keeps one process-wide state and refuses a second Accelerator with another
    # precision; stages run one after another in a process (a pipeline, the tests), each with its
    # own setting. The distributed part (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision="bf16" if bf16 and ok else "no", cpu=dev == "cpu")


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
    """Whether this process writes: the main one under `accelerate launch`, or any without `acc`."""
    return acc is None or acc.is_main_process


def barrier(acc: Any | None) -> None:
    """Wait for every process (nothing to wait for without `acc`)."""
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
