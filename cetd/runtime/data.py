"""Training data: read a job's file, tokenize it to a fixed length, and cut it into seeded batches.

Two kinds of data: text for causal language models (JSONL, ``{"text": ...}`` per line) and sentence
pairs for classification, QNLI-style (JSONL with ``question``/``sentence1``, ``sentence``/``sentence2``
and ``label``, or GLUE's TSV with a header). Models without tokenizer files (presets built from a
config) read bytes through `ByteTokenizer`. The batch order depends only on the job's seed and the
step, so every worker, and a worker resuming from a checkpoint, draws the very same examples.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from cetd.errors import JobError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of positions that carry no loss (padding), as in transformers."""

_LABEL_NAMES = {"entailment": 0, "not_entailment": 1, "0": 0, "1": 1}
_FIRST_KEYS = ("question", "sentence1")
_SECOND_KEYS = ("sentence", "sentence2")
_SPECIALS = 3  # pad, cls, sep


@dataclass(frozen=True, slots=True)
class Encoded:
    """One tokenized example, already padded or truncated to the sequence length."""

    input_ids: list[int]
    attention_mask: list[int]
    token_type_ids: list[int]


class Tokenizer(Protocol):
    """Turns text into fixed-length token ids."""

    def encode_text(self, text: str, seq_len: int) -> Encoded:
        """One text, truncated and padded to ``seq_len``."""

    def encode_pair(self, first: str, second: str, seq_len: int) -> Encoded:
        """Two texts joined the model's way (``[CLS] a [SEP] b [SEP]``), longest first truncated."""


class ByteTokenizer:
    """UTF-8 bytes as token ids, for models that ship no tokenizer.

    With room for them (a vocabulary of at least 259), ids 0..2 are pad, cls and sep (pad placed on the
    model's own pad id when that is one of them) and byte ``b`` is id ``b + 3``. A 256-entry vocabulary
    holds bytes only: byte ``b`` is id ``b``, padding reuses id 0 (masked out of attention and loss)
    and a pair is joined by a NUL byte.
    """

    def __init__(self, vocab_size: int, pad_token_id: int | None = None) -> None:
        if vocab_size < 256:
            raise JobError(f"a byte-level tokenizer needs a vocabulary of at least 256, not {vocab_size}")
        self.vocab_size = vocab_size
        self.offset = _SPECIALS if vocab_size >= 256 + _SPECIALS else 0
        if self.offset:
            pad = pad_token_id if pad_token_id is not None and 0 <= pad_token_id < _SPECIALS else 0
            others = [i for i in range(_SPECIALS) if i != pad]
            self.pad_token_id: int = pad
            self.cls_token_id: int | None = others[0]
            self.sep_token_id: int | None = others[1]
        else:
            self.pad_token_id, self.cls_token_id, self.sep_token_id = 0, None, None

    @classmethod
    def for_config(cls, config: Any) -> ByteTokenizer:
        """The byte tokenizer fitting a model config's vocabulary and pad id."""
        return cls(int(config.vocab_size), getattr(config, "pad_token_id", None))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens."""
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of byte ids; special ids are dropped."""
        data = bytes(i - self.offset for i in ids if self.offset <= i < 256 + self.offset)
        return data.decode("utf-8", errors="replace")

    def encode_text(self, text: str, seq_len: int) -> Encoded:
        return self._pad(self.encode(text)[:seq_len], [], seq_len)

    def encode_pair(self, first: str, second: str, seq_len: int) -> Encoded:
        a, b = self.encode(first), self.encode(second)
        if self.cls_token_id is not None and self.sep_token_id is not None:
            head, middle, tail = [self.cls_token_id], [self.sep_token_id], [self.sep_token_id]
        else:
            head, middle, tail = [], [0], []
        budget = seq_len - len(head) - len(middle) - len(tail)
        if budget < 2:
            raise JobError(f"sequence length {seq_len} is too short for a sentence pair")
        while len(a) + len(b) > budget:  # longest first, like transformers
            if len(a) >= len(b):
                a.pop()
            else:
                b.pop()
        return self._pad(head + a + middle, b + tail, seq_len)

    def _pad(self, segment_a: list[int], segment_b: list[int], seq_len: int) -> Encoded:
        ids = segment_a + segment_b
        padding = seq_len - len(ids)
        return Encoded(
            input_ids=ids + [self.pad_token_id] * padding,
            attention_mask=[1] * len(ids) + [0] * padding,
            token_type_ids=[0] * len(segment_a) + [1] * len(segment_b) + [0] * padding,
        )


class PretrainedTokenizer:
    """A transformers tokenizer behind the `Tokenizer` protocol."""

    def __init__(self, tokenizer: Any) -> None:
        if tokenizer.pad_token is None:
            # GPT-2 style tokenizers have no pad token; padded positions are masked out anyway.
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer

    def encode_text(self, text: str, seq_len: int) -> Encoded:
        return self._encoded(self.tokenizer(text, truncation=True, max_length=seq_len, padding="max_length"))

    def encode_pair(self, first: str, second: str, seq_len: int) -> Encoded:
        return self._encoded(
            self.tokenizer(first, second, truncation="longest_first", max_length=seq_len, padding="max_length")
        )

    @staticmethod
    def _encoded(out: Mapping[str, list[int]]) -> Encoded:
        ids = list(out["input_ids"])
        return Encoded(
            input_ids=ids,
            attention_mask=list(out["attention_mask"]),
            token_type_ids=list(out.get("token_type_ids", [0] * len(ids))),
        )


def tokenizer_for(pretrained: Any, config: Any) -> Tokenizer:
    """The model's own tokenizer when it has one, else a `ByteTokenizer` fitting its vocabulary."""
    if pretrained is not None:
        return PretrainedTokenizer(pretrained)
    return ByteTokenizer.for_config(config)


@dataclass(frozen=True, slots=True)
class TokenizedDataset:
    """Every example of a dataset as stacked tensors of one sequence length."""

    tensors: dict[str, torch.Tensor]
    """``input_ids``, ``attention_mask``, ``token_type_ids`` ``(N, S)`` and ``labels`` (``(N, S)`` or ``(N,)``)."""

    def __len__(self) -> int:
        return int(self.tensors["input_ids"].shape[0])

    def select(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The examples at ``indices`` as one batch."""
        return {name: tensor[indices] for name, tensor in self.tensors.items()}


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise JobError(f"no data file at {path}")
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise JobError(f"{path}, line {number}: not valid JSON ({error.msg})") from error
            if not isinstance(record, dict):
                raise JobError(f"{path}, line {number}: expected a JSON object")
            yield number, record


def read_texts(path: Path) -> list[str]:
    """The ``text`` of every line of a JSONL file."""
    texts = []
    for number, record in _json_lines(path):
        text = record.get("text")
        if not isinstance(text, str):
            raise JobError(f'{path}, line {number}: expected a string field "text"')
        texts.append(text)
    return texts


def _label(value: object, where: str) -> int:
    label = _LABEL_NAMES.get(str(value).strip().lower()) if not isinstance(value, bool) else None
    if label is None:
        raise JobError(f"{where}: label {value!r} is not entailment, not_entailment, 0 or 1")
    return label


def _field(record: Mapping[str, Any], keys: Sequence[str], where: str) -> str:
    for key in keys:
        if isinstance(record.get(key), str):
            return str(record[key])
    raise JobError(f"{where}: expected a string field {' or '.join(repr(k) for k in keys)}")


def read_pairs(path: Path) -> list[tuple[str, str, int]]:
    """(first text, second text, label) of a QNLI-style JSONL file or GLUE TSV (by the ``.tsv`` suffix)."""
    if path.suffix.lower() != ".tsv":
        return [
            (
                _field(record, _FIRST_KEYS, f"{path}, line {number}"),
                _field(record, _SECOND_KEYS, f"{path}, line {number}"),
                _label(record.get("label"), f"{path}, line {number}"),
            )
            for number, record in _json_lines(path)
        ]
    if not path.is_file():
        raise JobError(f"no data file at {path}")
    pairs = []
    with path.open(encoding="utf-8", newline="") as rows:
        reader = csv.reader(rows, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise JobError(f"{path} is empty")
        columns = {name.strip(): i for i, name in enumerate(header)}
        missing = [name for name in ("question", "sentence", "label") if name not in columns]
        if missing:
            raise JobError(f"{path}, line 1: the header lacks {', '.join(missing)}")
        for number, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise JobError(f"{path}, line {number}: {len(row)} fields, the header has {len(header)}")
            pairs.append(
                (
                    row[columns["question"]],
                    row[columns["sentence"]],
                    _label(row[columns["label"]], f"{path}, line {number}"),
                )
            )
    return pairs


def tokenize_texts(texts: Sequence[str], tokenizer: Tokenizer, seq_len: int) -> TokenizedDataset:
    """Causal-LM examples: labels are the input ids, -100 on padding; texts under two tokens are dropped."""
    encoded = [tokenizer.encode_text(text, seq_len) for text in texts]
    kept = [e for e in encoded if sum(e.attention_mask) >= 2]
    if len(kept) < len(encoded):
        logger.info("dropped %d texts shorter than two tokens", len(encoded) - len(kept))
    if not kept:
        raise JobError("the dataset has no text of at least two tokens")
    tensors = _stack(kept)
    tensors["labels"] = tensors["input_ids"].masked_fill(tensors["attention_mask"] == 0, IGNORE_INDEX)
    return TokenizedDataset(tensors)


def tokenize_pairs(pairs: Sequence[tuple[str, str, int]], tokenizer: Tokenizer, seq_len: int) -> TokenizedDataset:
    """Sequence-classification examples of sentence pairs."""
    if not pairs:
        raise JobError("the dataset has no examples")
    tensors = _stack([tokenizer.encode_pair(first, second, seq_len) for first, second, _ in pairs])
    tensors["labels"] = torch.tensor([label for _, _, label in pairs], dtype=torch.long)
    return TokenizedDataset(tensors)


def _stack(encoded: Sequence[Encoded]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.tensor([e.input_ids for e in encoded], dtype=torch.long),
        "attention_mask": torch.tensor([e.attention_mask for e in encoded], dtype=torch.long),
        "token_type_ids": torch.tensor([e.token_type_ids for e in encoded], dtype=torch.long),
    }


def load_dataset(path: Path, *, task: str, tokenizer: Tokenizer, seq_len: int, max_seq_len: int) -> TokenizedDataset:
    """Read and tokenize a job's data file for ``task`` (``causal_lm`` or ``sequence_classification``).

    Raises:
        JobError: the file is missing or malformed (the message names the line), holds no examples,
            or ``seq_len`` is outside 2..``max_seq_len``.
    """
    if seq_len > max_seq_len:
        raise JobError(f"sequence length {seq_len} exceeds the model's maximum of {max_seq_len}")
    if seq_len < 2:
        raise JobError(f"sequence length must be at least 2, not {seq_len}")
    if task == "causal_lm":
        texts = read_texts(path)
        if not texts:
            raise JobError(f"{path} holds no examples")
        return tokenize_texts(texts, tokenizer, seq_len)
    if task == "sequence_classification":
        pairs = read_pairs(path)
        if not pairs:
            raise JobError(f"{path} holds no examples")
        return tokenize_pairs(pairs, tokenizer, seq_len)
    raise JobError(f"no data loader for task {task!r}")


def step_examples(dataset_size: int, step: int, *, global_batch: int, seed: int) -> torch.Tensor:
    """Indices of the examples of ``step``: consecutive slices of one seeded permutation per epoch."""
    first = step * global_batch
    positions = range(first, first + global_batch)
    permutations: dict[int, torch.Tensor] = {}
    indices = []
    for position in positions:
        epoch, offset = divmod(position, dataset_size)
        if epoch not in permutations:
            generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
            permutations[epoch] = torch.randperm(dataset_size, generator=generator)
        indices.append(permutations[epoch][offset])
    return torch.stack(indices)


def step_batches(
    dataset: TokenizedDataset, step: int, *, global_batch: int, micro_batches: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """The ``micro_batches`` micro-batches (each ``global_batch / micro_batches`` examples) of one step."""
    if micro_batches < 1 or global_batch % micro_batches:
        raise JobError(f"a global batch of {global_batch} cannot be split into {micro_batches} equal micro-batches")
    indices = step_examples(len(dataset), step, global_batch=global_batch, seed=seed)
    return [dataset.select(chunk) for chunk in indices.chunk(micro_batches)]


def make_batches(
    dataset: TokenizedDataset,
    *,
    global_batch: int,
    micro_batches: int,
    seed: int,
    steps: int,
    start_step: int = 0,
) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Steps ``start_step .. steps - 1``, each a list of micro-batches (see `step_batches`)."""
    for step in range(start_step, steps):
        yield step_batches(dataset, step, global_batch=global_batch, micro_batches=micro_batches, seed=seed)
