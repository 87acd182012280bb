"""One training process among several started by torchrun, or the only one: rank, device, collectives, the
model wrapper (DDP or FSDP2) and the gather of sharded state before anything is written.

torchrun (`torch.distributed.run`) starts one process per rank and sets RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT; `Parallel.from_environment` joins the process group with gloo on the CPU and nccl
on CUDA (device `cuda:<LOCAL_RANK>`), as torch.distributed's docs recommend. Without those variables it is the one
process of an ordinary run and every method is the identity.

Strategies:
- "ddp": `torch.nn.parallel.DistributedDataParallel` on the AdapterModel: every rank holds the whole model, the
  gradients of the trainable (adapter) parameters are averaged over ranks in backward. Its construction
  broadcasts rank 0's parameters and buffers, so every rank starts from the same weights.
- "fsdp": torch's `fully_shard` (FSDP2, `torch.distributed.fsdp`) on every transformer block (the model's
  `_no_split_modules`) and on the root: parameters become DTensors sharded on dim 0, gathered for each block's
  forward and backward; gradients are averaged over ranks as with DDP. Before writing, adapter tensors are
  gathered in full (`DTensor.full_tensor()`) and the optimizer state through
  `torch.distributed.checkpoint.state_dict` (full_state_dict=True, cpu_offload=True); loading sets it back on
  every rank. torch 2.13 runs it with gloo on the CPU as well.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from adapterflow.state_dict import SaveEmbeddingLayers, check_saveable, get_adapter_state_dict

STRATEGIES = ("ddp", "fsdp")
OPTIMIZER_KEYS_FQN = "fqn"  # training_state.pt: FSDP's optimizer state is keyed by parameter name, not index


@dataclass(frozen=True)
class Parallel:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "ddp"
    device: str = "cpu"

    @classmethod
    def from_environment(cls, strategy: str, device: str) -> "Parallel":
        """This process's place in a torchrun job (joining the process group), or the single process.

        Args:
            strategy: "ddp" or "fsdp" (used when WORLD_SIZE > 1).
            device: "cpu" or "cuda" (the job's device type; CUDA ranks take cuda:LOCAL_RANK).
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls(strategy=strategy, device=device)
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        return cls(rank, world_size, local_rank, strategy, device)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main_process(self) -> bool:
        """Rank 0: the one process that writes files and logs."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.distributed and self.strategy == "fsdp"

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64; a tensor on this rank's device, as nccl needs)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to run forward and backward through: the model itself, a DDP wrapper, or the model sharded
        in place (FSDP2). Create the optimizer after this: fully_shard replaces the parameters."""
        if not self.distributed:
            return model
        if self.strategy == "ddp":
            ids = [self.local_rank] if self.device.startswith("cuda") else None
            return nn.parallel.DistributedDataParallel(model, device_ids=ids)
        from torch.distributed.fsdp import fully_shard

        blocks = set(getattr(model.get_base_model(), "_no_split_modules", None) or ())
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module)
        fully_shard(model)
        return model

    def accumulating(self, module: nn.Module, last: bool):
        """Context for one micro-batch: gradients are synchronised over ranks only in the last one."""
        if self.distributed and self.strategy == "ddp" and not last:
            return module.no_sync()
        if self.sharded:
            module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def full_adapter_state(self, model: nn.Module, config, adapter_name: str,
                           save_embedding_layers: SaveEmbeddingLayers) -> dict[str, torch.Tensor]:
        """The adapter's tensors in full on every rank (a collective under FSDP: every rank calls it), checked by
        `check_saveable` against the config and the model's (unsharded) shapes."""
        state = get_adapter_state_dict(model, config, adapter_name, save_embedding_layers)
        if self.sharded:
            from torch.distributed.tensor import DTensor

            state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}
        check_saveable(state, config, model, adapter_name)
        return state

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """What training_state.pt keeps of the optimizer: its state_dict, or under FSDP the full state keyed by
        parameter name (a collective; complete on rank 0)."""
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {"keys": OPTIMIZER_KEYS_FQN, **get_optimizer_state_dict(model, optimizer, options=options)}

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Inverse of `optimizer_state`, on every rank (each reads the same checkpoint file).

        Raises:
            ValueError: the state was written by the other strategy (its keys do not fit this optimizer).
        """
        if (state.get("keys") == OPTIMIZER_KEYS_FQN) != self.sharded:
            written = "fsdp" if state.get("keys") == OPTIMIZER_KEYS_FQN else "ddp or one process"
            raise ValueError(f"the checkpoint's optimizer state was written with training.strategy={written}; "
                             f"resume with that strategy")
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = {k: v for k, v in state.items() if k != "keys"}
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
