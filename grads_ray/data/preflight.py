"""Problems that would reject every row for one cause, found before Ray starts.

A model folder without a tokenizer given text rows, or a chat template that cannot place the
assistant turns, rejects the whole corpus row by row (``no_tokenizer``, ``chat_template``): a run
would score nothing and hand on nothing. :func:`check_corpus_encodes` reads the corpus's first rows
(a few hundred lines at most) and encodes them as the scorers will; when none of the first ``sample`` usable rows encodes and all
fail for one such cause, it is a configuration error naming the key to change.
"""

from __future__ import annotations

import itertools
import json

from grads_ray.config import Config, ConfigError
from grads_ray.data.formats import RowError, normalize
from grads_ray.data.readers import plan_shards, read_shard, validate_rows
from grads_ray.data.tokenize import encode, load_tokenizer
from grads_ray.storage import is_url

# reasons that come from the model folder, not from the row: every row fails alike
WHOLE_CORPUS = {"no_tokenizer": "has no tokenizer, and the corpus holds text rows (prompt/response or chat)",
                "chat_template": "has a chat template that does not place the assistant turns"}


def check_corpus_encodes(cfg: Config, sample: int = 64) -> None:
    """Raise ``ConfigError`` when the first ``sample`` usable rows of ``cfg.data.paths`` all fail to
    encode for one cause that lies in the model folder. A row that encodes, a mixed set of reasons,
    or row-level causes (``too_long``, ``empty_response``) pass: those rows are rejected one by one."""
    key, model = ("score.model", cfg.score.model) if cfg.score.model else ("model.path", cfg.model.path)
    if is_url(model):  # its tokenizer would mean fetching the whole folder to the driver: the scorers say
        return
    d = cfg.data
    head = sample * 8  # lines read at most (bad lines among them are passed over)
    shards = plan_shards(d.paths, d.shard_bytes, d.shard_rows, min(d.limit or head, head))
    items = (item for s in shards for item in validate_rows(read_shard(s)) if "reason" not in item)
    reasons, first = set(), None
    tokenizer = load_tokenizer(model, cfg.model.trust_remote_code)
    for item in itertools.islice(items, sample):
        try:
            encode(normalize(json.loads(item["record"])), tokenizer, d.max_length, d.on_long)
            return
        except RowError as err:
            reasons.add(err.reason)
            first = first or (item, err)
    if first is None or len(reasons) != 1 or next(iter(reasons)) not in WHOLE_CORPUS:
        return
    item, err = first
    raise ConfigError(f"{key} {model} {WHOLE_CORPUS[err.reason]}: every row would be rejected as "
                      f"{err.reason} (first: {item['source']}:{item['line']}: {err.detail}). "
                      "Use a model folder that has one, or pre-tokenized rows (input_ids, labels).")
