"""Contender (c): torch.distributed.pipelining over gloo, two processes of one thread, one core each.

``python -m bench.pipeline.torch_job`` runs one rank (= one stage) of the same job as cetd's pipeline:
the same model folder, the same block boundaries, the same micro-batches and schedule (GPipe or 1F1B),
AdamW with the same settings. Stages are built by hand (`PipelineStage`) from cetd's own stage code
(`ModelAdapter.make_stage`): embedding, blocks and head compute exactly what cetd's stages compute,
eager attention with the causal mask each stage builds itself. The loss is computed on the last stage
by the schedule's ``loss_fn``; the tied embedding / LM-head weight lives on both stages and its
gradient is summed with an all-reduce before the optimizer step, as cetd does.

Pitfalls this avoids (see DESIGN.md): without the all-reduce the two copies of the tied weight drift;
blocks handed no mask under eager attention are not causal (each stage builds the causal mask); blocks
return a bare tensor in transformers 5.x; the loss upcasts logits to float32 as HF's does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from bench.pipeline.child import emit, mark, start, step_report
from bench.pipeline.workload import load_workload
from cetd.runtime.models import StageModule
from cetd.runtime.models.base import causal_lm_loss
from cetd.runtime.reference import build_adamw
from cetd.runtime.spec import JobSpec, from_json
from cetd.runtime.worker import adamw_settings


def _unpadded(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch fields a stage reads when no sequence is padded (the benchmark data never is)."""
    return {"attention_mask": torch.ones(tokens.shape[:2], dtype=torch.long)}


class _FirstStage(nn.Module):
    """Token ids in, activations out."""

    def __init__(self, stage: StageModule) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch: Mapping[str, torch.Tensor] = {"input_ids": input_ids, **_unpadded(input_ids)}
        return self.stage.run_blocks(self.stage.embed(batch), batch)


class _LastStage(nn.Module):
    """Activations in, logits out (the schedule's ``loss_fn`` turns them into the loss)."""

    def __init__(self, stage: StageModule) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch = _unpadded(hidden)
        return self.stage.head_logits(self.stage.run_blocks(hidden, batch), batch)


def main() -> None:
    launch = start("torch")
    rank = int(launch["rank"])
    spec = from_json(JobSpec, json.dumps(launch["spec"]))
    boundaries: list[int] = launch["boundaries"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{launch['port']}", rank=rank, world_size=2)
    try:
        loaded = load_workload(spec)
        first, last = rank == 0, rank == 1
        stage = loaded.adapter.make_stage(
            loaded.model, boundaries[rank], boundaries[rank + 1], first=first, last=last
        )
        module = _FirstStage(stage) if first else _LastStage(stage)
        pipe = PipelineStage(module, rank, 2, torch.device("cpu"))
        schedule_class = Schedule1F1B if spec.schedule == "1f1b" else ScheduleGPipe
        schedule = schedule_class(pipe, n_microbatches=spec.micro_batches, loss_fn=causal_lm_loss)
        optimizer = build_adamw(stage.parameters(), adamw_settings(spec))
        tied = stage.tied_parameters()
        steps = [loaded.step_batches(spec, step) for step in range(spec.steps)]
        marks = [mark()]
        step_losses: list[float] = []
        for micro_batches in steps:
            if first:
                schedule.step(torch.cat([mb["input_ids"] for mb in micro_batches]))
            else:
                losses: list[torch.Tensor] = []
                schedule.step(target=torch.cat([mb["labels"] for mb in micro_batches]), losses=losses, return_outputs=False)
                step_losses.append(sum(float(loss.detach().to(torch.float64)) for loss in losses) / len(losses))
            for name in sorted(tied):
                grad = tied[name].grad
                if grad is None:
                    grad = tied[name].grad = torch.zeros_like(tied[name])
                dist.all_reduce(grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            marks.append(mark())
        emit("done", losses=step_losses, **step_report(marks))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
