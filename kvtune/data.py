"""Text sources and token streams: the embedded pydoc corpus (calib/eval halves) or a user's file.

Sources (looked up in :data:`SOURCES`, or any existing file path):

* ``pydoc:calib`` / ``pydoc:eval`` -- Python's own reference documentation, ``pydoc_data.topics.topics``
  (a dict topic -> text, shipped with every CPython). The topic keys are sorted; topics at even positions
  form the calibration half, topics at odd positions the evaluation half, so the halves are disjoint,
  deterministic and both span the whole alphabet of topics. Each half's text is its topics' texts (stripped)
  joined by blank lines. The corpus differs between Python versions, so :func:`data_hash` does too.
  Sizes on CPython 3.11.7 (79 topics): calib 40 topics, 253,421 characters, 61,784 SmolLM2 tokens; eval
  39 topics, 211,624 characters, 51,321 SmolLM2 tokens.
* ``PATH`` -- any existing UTF-8 text file.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvtune.errors import KVTuneError

log = logging.getLogger(__name__)


def pydoc_topics(half: str) -> list[str]:
    """Sorted topic names of one half (``"calib"``: even positions, ``"eval"``: odd) of the pydoc corpus."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    return keys[0::2] if half == "calib" else keys[1::2]


def _pydoc_text(half: str) -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in pydoc_topics(half))


SOURCES: dict[str, Callable[[], str]] = {
    "pydoc:calib": lambda: _pydoc_text("calib"),
    "pydoc:eval": lambda: _pydoc_text("eval"),
}


def load_text(source: str) -> str:
    """The text of an embedded source (``pydoc:calib``, ``pydoc:eval``) or of an existing UTF-8 file."""
    if source in SOURCES:
        return SOURCES[source]()
    hint = f"pass {', '.join(SOURCES)} or the path of a UTF-8 text file"
    if source.startswith("pydoc:"):
        raise KVTuneError(f"unknown text source {source!r}", hint)
    path = Path(source).expanduser()
    if not path.is_file():
        raise KVTuneError(f"text file not found: {path}", hint)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise KVTuneError(f"{path} is not UTF-8 text (byte {exc.start})", "convert it to UTF-8") from None
    except OSError as exc:
        raise KVTuneError(f"cannot read {path}: {exc.strerror}", "check its permissions") from None
    if not text.strip():
        raise KVTuneError(f"text file {path} is empty", hint)
    return text


def data_hash(text: str) -> str:
    """Hex SHA-256 of ``text`` as UTF-8: recorded in calibrations and plans as data provenance."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def token_chunks(tokenizer: Any, text: str, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenize ``text`` (no special tokens) into fixed-length chunks; the tail shorter than a chunk is dropped.

    ``max_tokens`` caps how many tokens are used (from the start). Returns ``[n_chunks, seq_len]`` int64.
    """
    if seq_len < 1:
        raise KVTuneError(f"sequence length must be >= 1, got {seq_len}")
    if max_tokens is not None and max_tokens < seq_len:
        raise KVTuneError(f"max tokens {max_tokens} is less than one chunk of {seq_len}",
                          "raise the token budget or lower the sequence length")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n_tokens = len(ids)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_chunks = len(ids) // seq_len
    if n_chunks == 0:
        raise KVTuneError(f"the text has {n_tokens} tokens, fewer than one chunk of {seq_len}",
                          "use a longer text or a shorter sequence length")
    log.debug("%d tokens -> %d chunks of %d", n_tokens, n_chunks, seq_len)
    # chunks: [n_chunks, seq_len] int64
    return torch.tensor(ids[: n_chunks * seq_len], dtype=torch.long).view(n_chunks, seq_len)
