"""Single-process reference training for the equivalence tests, and the data files they train on."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch


def write_text_data(path: Path, lines: int = 80) -> Path:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "seven", "small", "birds", "sing"]
    with path.open("w") as stream:
        for i in range(lines):
            line = " ".join(words[(i * j) % len(words)] for j in range(3, 3 + 6 + i % 5))
            stream.write(json.dumps({"text": f"{line} {i}"}) + "\n")
    return path


def write_pair_data(path: Path, lines: int = 80) -> Path:
    with path.open("w") as stream:
        for i in range(lines):
            stream.write(json.dumps({"question": f"what is item {i}?",
                                     "sentence": f"item {i} is a thing number {i % 7}", "label": i % 2}) + "\n")
    return path


@cache
def reference_run(model_name: str, data_path: Path, *, steps: int, seed: int, global_batch: int = 8,
                  micro_batches: int = 4, seq_len: int = 16, lr: float = 1e-4
                  ) -> tuple[tuple[float, ...], dict[str, torch.Tensor], torch.nn.Module]:
    """Losses, final parameters and the trained model of single-process training (cached per job)."""
    from cetd.runtime.data import load_dataset, step_batches, tokenizer_for
    from cetd.runtime.models.loading import load_model
    from cetd.runtime.reference import AdamWSettings, train_reference

    torch.set_num_threads(1)
    model, pretrained, adapter = load_model(model_name, seed=seed, dtype=torch.float32)
    dataset = load_dataset(data_path, task=adapter.task, tokenizer=tokenizer_for(pretrained, model.config),
                           seq_len=seq_len, max_seq_len=adapter.max_seq_len())
    batches = [step_batches(dataset, step, global_batch=global_batch, micro_batches=micro_batches, seed=seed)
               for step in range(steps)]
    run = train_reference(model, batches, settings=AdamWSettings(lr=lr, weight_decay=0.0), seed=seed,
                          adapter=adapter)
    model.eval()
    return tuple(run.losses), {k: v.detach().clone() for k, v in run.state_dict.items()}, model


def max_param_gap(output: Path, reference_state: dict[str, torch.Tensor], causal: bool) -> float:
    """Largest absolute difference between the exported model's parameters and the reference's."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    state = auto.from_pretrained(output, local_files_only=True, attn_implementation="eager").state_dict()
    return max((state[name].float() - value.float()).abs().max().item() for name, value in reference_state.items())
