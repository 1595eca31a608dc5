"""Callbacks for subprocess training runs: simulated failures, and records of what the run did."""

import json
import os
import signal
from pathlib import Path

import lightning as L
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor


class KillAtStep(L.Callback):
    """SIGKILLs its own process at the start of the first batch after ``step`` optimizer steps, i.e. right
    after the checkpoint written at that step: the hardest possible stop (no cleanup, no final save).

    Once per process rank and run folder (a marker file in ``trainer.default_root_dir``), so the killed command,
    run again unchanged, resumes instead of being killed again.
    """

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        marker = Path(trainer.default_root_dir) / f"killed_at_step_{self.step}_rank_{trainer.global_rank}"
        if trainer.global_step >= self.step and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)


class RecordSharding(L.Callback):
    """Writes ``<out>/sharding_rank<r>.json`` per process: for every transformer parameter, whether it is a DTensor,
    its placements, local element count, global shape and dtype at the first step; the dtypes of the first block's
    parameters inside its forward (FSDP2 gathers them, in the mixed-precision policy's dtype); the gradients' dtypes;
    which of the root and its blocks are FSDP units (one ``fully_shard`` each), and the first block's reduce dtype
    (FSDP2 casts reduced gradients back to the shard's dtype, so only its policy shows it; a private attribute)."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.record: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.record:
            return
        params = {}
        for name, param in pl_module.transformer.named_parameters():
            is_dtensor = isinstance(param, DTensor)
            params[name] = {"dtensor": is_dtensor, "placements": str(param.placements) if is_dtensor else None,
                            "local": param.to_local().numel() if is_dtensor else param.numel(),
                            "shape": list(param.shape), "dtype": str(param.dtype)}
        transformer = pl_module.transformer
        self.record = {"world_size": trainer.world_size, "params": params, "forward_dtypes": [],
                       "fsdp_units": [isinstance(m, FSDPModule) for m in (transformer, *transformer.blocks)],
                       "reduce_dtype": str(transformer.blocks[0]._get_fsdp_state()._mp_policy.reduce_dtype)
                       if isinstance(transformer.blocks[0], FSDPModule) else None}
        pl_module.transformer.blocks[0].register_forward_pre_hook(self._record_forward_dtypes)

    def _record_forward_dtypes(self, block, args):
        if not self.record["forward_dtypes"]:
            self.record["forward_dtypes"] = sorted({str(p.dtype) for p in block.parameters()})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.record.setdefault("grad_dtypes", sorted({str(p.grad.dtype) for p in pl_module.transformer.parameters()
                                                      if p.grad is not None}))

    def on_train_end(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"sharding_rank{trainer.global_rank}.json").write_text(json.dumps(self.record))
