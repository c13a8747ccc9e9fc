"""Scheduled curation: scoring a new corpus version with the shard cache vs scoring it from scratch.

    python benchmarks/rescoring.py --quick    # the demo corpus (about 2,600 rows), the demo model
    python benchmarks/rescoring.py            # the corpus repeated 4 times

Version 1 is the demo corpus (three files); version 2 appends a new file of `--new` (10%) more rows
and edits one row in one file. Both runs score into the same output folder with the scoring model
pinned (no warm-up), so version 2 takes unchanged shards from the cache; the baseline scores
version 2 in a fresh folder with an empty cache, in the same process and machine. Prints the stage
times, shards reused and the speed-up; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import timed  # noqa: E402
from grads_ray.cli import main as cli  # noqa: E402
from grads_ray.rundir import read_json  # noqa: E402


def _score(args: list[str], out: Path, *extra: str) -> float:
    code, seconds = timed(cli, ["score", *args, "--output", str(out), *extra])
    if code != 0:
        raise SystemExit(f"grads-ray score failed ({code})")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the demo corpus once (a few CPU minutes)")
    ap.add_argument("--new", type=float, default=0.10, help="rows added in version 2, as a share of version 1")
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from grads_ray.demo.corpus import build_corpus, sft_rows
    from grads_ray.demo.model import build_demo_model

    work = Path(a.work or tempfile.mkdtemp(prefix="grads-ray-rescoring-"))
    assets = work / "assets"
    paths = build_corpus(assets)
    rows = sft_rows()
    build_demo_model(assets / "model", [r["prompt"] + "\n" + r["response"] for r in rows])
    corpus = Path(paths["corpus"])
    if not a.quick:  # the same rows four times over, with ids made unique
        for f in sorted(corpus.glob("*.jsonl")):
            lines = f.read_text().splitlines()
            out = []
            for k in range(4):
                for line in lines:
                    row = json.loads(line)
                    row["id"] = f"{row.get('id', f.name)}#{k}"
                    out.append(json.dumps(row))
            f.write_text("\n".join(out) + "\n")
    n_v1 = sum(len(f.read_text().splitlines()) for f in corpus.glob("*.jsonl"))
    args = ["--model", str(assets / "model"), "--data", str(corpus), "warmup.enabled=false", "data.max_length=256",
            "data.shard_bytes=65536", "score.batch_size=16"]

    out = work / "run"
    t_v1 = _score(args, out)

    first = sorted(corpus.glob("*.jsonl"))[0]  # version 2: one row edited, one file of new rows
    lines = first.read_text().splitlines()
    row = json.loads(lines[len(lines) // 2])
    key = "response" if "response" in row else ("output" if "output" in row else None)
    if key:
        row[key] += " (edited)"
    else:
        row["messages"][-1]["content"] += " (edited)"
    lines[len(lines) // 2] = json.dumps(row)
    first.write_text("\n".join(lines) + "\n")
    extra = int(round(a.new * n_v1))
    new_rows = [{"id": f"v2-{i}", "prompt": rows[i % len(rows)]["prompt"] + f" (v2 {i})",
                 "response": rows[i % len(rows)]["response"]} for i in range(extra)]
    (corpus / "v2_new.jsonl").write_text("".join(json.dumps(r) + "\n" for r in new_rows))

    t_cached = _score(args, out)
    info = read_json(out / "stats" / ".ledger" / "SUCCESS.json")
    t_fresh = _score(args, work / "fresh", f"score.cache_dir={work / 'empty-cache'}")
    fresh = read_json(work / "fresh" / "stats" / ".ledger" / "SUCCESS.json")
    summary = {"rows_v1": n_v1, "rows_v2": fresh["scored"] + fresh["rejected"], "v1_s": round(t_v1, 1),
               "v2_cached_s": round(t_cached, 1), "v2_fresh_s": round(t_fresh, 1),
               "shards_reused": info["shards_reused"], "shards_scored": info["shards_this_run"],
               "speedup": round(t_fresh / t_cached, 2)}
    print(f"version 1: {n_v1} rows scored in {t_v1:.1f} s")
    print(f"version 2 (+{extra} rows, 1 edited): {t_cached:.1f} s with the cache ({info['shards_reused']} shards "
          f"reused, {info['shards_this_run']} scored) vs {t_fresh:.1f} s from scratch: {t_fresh / t_cached:.2f}x")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
