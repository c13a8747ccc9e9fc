"""Per-example gradients against a peer: EleutherAI's bergson 2.5.1 collector, grads-ray's exact batched
engine (``BatchedGradStats``) and a plain batched training step, on the same randomly initialised model
(the configs of benchmarks/grad_stats.py), the same N examples of up to T tokens, cut into the same
batches, on the same device, in one process. The figures are examples/s of each side over the same N
examples; the headline is a ratio measured in this run (grads-ray examples/s over bergson's), never a
wall time to compare across machines.

What each side computes per example (they are not the same work, so the ratio is not like for like):

- ``bergson``: what ``bergson build`` runs in each worker, minus its disk writer (``InMemoryCollector``
  driven by ``CollectorComputer.run_with_collector_hooks``, as ``bergson.collection.collect_gradients``
  drives its ``GradientCollector``): the model set up as its ``setup_model_and_peft`` does (every
  parameter frozen but the input embedding, so autograd still forms the embedding's summed gradient,
  and the tied LM head's with it); forward and backward hooks on every ``nn.Linear`` of
  ``model.base_model`` (so not the embedding, not the LM head, tied or not, no norms, no biases:
  ``include_bias`` off); each module's per-example gradient Σ_t δ_t a_tᵀ projected on both sides to
  p × p (``--proj-dim``, default 16) by its own Gaussian matrices (``projection_type="normal"``,
  entries N(0, 1/p), never forming the gradient), cast to the model's dtype and copied to a host
  buffer; plus the per-example loss. Options: ``loss_reduction="mean"`` (each example's mean
  response-token loss, the loss grads-ray differentiates; bergson's default is the sum), the rest
  bergson's defaults. Its batches come from a ``datasets.Dataset`` of the same rows, fetched and
  padded by bergson (inside its timing) on the right to the batch's longest row, as the other two
  sides' batches are here; it calls the model without an attention mask (causal, right padding: the
  same numbers), the other two with one.
- ``grads-ray``: one pass of ``BatchedGradStats`` per batch: the exact per-example loss and, over
  every trainable parameter (embedding, tied head, norms, biases included) and per layer group, the
  gradient's L2 norm, mean, std, max and min; a 512-d projected gradient (each parameter's Kronecker
  sketch P_r G P_cᵀ of rank 8, then a count sketch of all of them to 512); the mean last hidden state
  and the FisherSFT factor (64-d, rank 4).
- ``plain step``: one training step's forward and backward of the batch's mean response-token loss
  (summed weight gradients, no optimizer): the floor any per-example method pays.

Exactness where they overlap (on wherever bergson runs; ``--no-check`` turns it off): both sides project a
linear layer's per-example gradient the same way (left p × out and right p × in matrices, Σ_t of
outer products of the projected δ and input). After the timing, on the first batch with the model in
float32, grads-ray's engine is run with bergson's own left and right matrices in place of its
Kronecker blocks for the weights bergson hooks (and its count sketch left out), and each module's
p × p block is compared with what bergson's collector stored: the JSON's ``exactness`` gives the
largest relative error ‖ours - bergson‖ / ‖bergson‖ over examples and modules, and that of the
per-example losses (bergson's ``per_doc_losses``). The rest of what
grads-ray computes has no counterpart in bergson to check against.

The bergson calls were checked against the source of bergson 2.5.1 as published (the wheel
bergson-2.5.1-py3-none-any.whl, sha256 a9660b61...9fb6): ``IndexConfig`` (run_path, projection_dim,
projection_type, projection_scale, projection_seed, loss_reduction, partial_run_path), ``bergson.utils.worker_utils.processor_for``,
``InMemoryCollector(model=, cfg=, processor=, data=)``, its ``gradients`` dict (module name ->
(rows, p·p)) and ``per_doc_losses``, ``CollectorComputer(model=, data=, collector=, batches=, cfg=)``,
``bergson.collector.collector.create_module_projection_matrix``. Another version may differ.

Where bergson is not importable its side is skipped with one line saying so, and the JSON has
``"bergson": null`` and ``"bergson_skipped"``. Install it with ``pip install bergson==2.5.1`` where it
installs; on a CPU-only machine it pulls torchvision and torchaudio, which may replace the CPU build
of torch with another: use a separate environment there.

    python benchmarks/bergson_peer.py --quick                 # tiny model, a CPU minute
    python benchmarks/bergson_peer.py --model qwen0.5b --n 256 --length 512 --batch 16   # on a GPU

The last line printed is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from grad_stats import IGNORE_INDEX, MODELS, build_model, make_batch, plain_step  # benchmarks/ on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BERGSON_VERSION = "2.5.1"  # the version whose source the calls below were checked against
INSTALL_HINT = (f"install it with `pip install bergson=={BERGSON_VERSION}` where it installs (on a CPU-only "
                "machine it pulls torchvision/torchaudio, which may replace the CPU torch build: use a "
                "separate environment)")
COMPUTES = {
    "bergson": "InMemoryCollector + CollectorComputer: per-example gradient of every nn.Linear weight of "
               "model.base_model (no embedding, LM head, norms or biases), each projected on both sides "
               "to p x p (normal, N(0,1/p)); per-example loss; mean response-token loss",
    "grads_ray": "BatchedGradStats: exact per-example loss; L2 norm, mean, std, max, min of the gradient "
                 "over every parameter, overall and per layer group; 512-d Kronecker + count-sketch "
                 "projected gradient; mean last hidden state; FisherSFT factor (64-d, rank 4)",
    "plain_step": "forward + backward of the batch's mean response-token loss (summed weight gradients)",
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def trim(batch):
    """Drop the columns that are padding in every row (right padding): what bergson's padder does."""
    ids, labels, mask = batch
    t = int(mask.sum(1).max())
    return ids[:, :t], labels[:, :t], mask[:, :t]


def import_bergson():
    """-> (module, None) or (None, why not)."""
    try:
        import bergson
        from bergson import CollectorComputer, IndexConfig, InMemoryCollector  # noqa: F401
        from bergson.utils.worker_utils import processor_for  # noqa: F401
    except Exception as e:  # ImportError, or a broken torchvision/torch pairing failing at import
        return None, f"bergson not importable ({type(e).__name__}: {e})"
    return bergson, None


class Bergson:
    """bergson's collector on the benchmark's examples, as rows of token lists (it pads them itself)."""

    def __init__(self, model, batches, proj_dim: int, workdir: str):
        from bergson import IndexConfig
        from datasets import Dataset

        assert IGNORE_INDEX == -100  # bergson's padder and loss take -100 for unlabelled positions
        self.model = model
        ids, labels = [], []
        for x, y, m in batches:
            for i in range(len(x)):
                k = int(m[i].sum())
                ids.append(x[i, :k].tolist())
                labels.append(y[i, :k].tolist())
        self.ds = Dataset.from_dict({"input_ids": ids, "labels": labels, "length": [len(r) for r in ids]})
        b = len(batches[0][0])
        self.order = [list(range(s, s + b)) for s in range(0, len(ids), b)]
        self.cfg = IndexConfig(run_path=f"{workdir}/index", projection_dim=proj_dim, projection_type="normal",
                               loss_reduction="mean")
        self.cfg.partial_run_path.mkdir(parents=True, exist_ok=True)  # it saves total_processed.pt there
        self.fresh()

    def fresh(self) -> None:
        """A new processor: it caches the projection matrices across passes, keyed by device, not dtype."""
        from bergson.utils.worker_utils import processor_for

        self.processor = processor_for(self.cfg)

    def __call__(self, n_batches: int):
        """Collect the first ``n_batches`` batches -> the collector (``.gradients``: name -> (rows, p*p))."""
        from bergson import CollectorComputer, InMemoryCollector

        order = self.order[:n_batches]
        data = self.ds.select(range(order[-1][-1] + 1))
        model = self.model
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:  # as bergson's setup_model_and_peft leaves the model
            model.requires_grad_(False)
            model.get_input_embeddings().requires_grad_(True)
            col = InMemoryCollector(model=model.base_model, cfg=self.cfg, processor=self.processor, data=data)
            CollectorComputer(model=model, data=data, collector=col, batches=order,
                              cfg=self.cfg).run_with_collector_hooks(desc="bergson")
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
        model.zero_grad(set_to_none=True)
        return col


def check_exact(model, bergson_run: Bergson, batch, proj_dim: int) -> dict:
    """grads-ray's engine with bergson's projection matrices against bergson's stored gradients, on
    ``batch`` (the first one), both in the model's current dtype (float32 here)."""
    from bergson.collector.collector import create_module_projection_matrix

    from grads_ray.gradients.engine import BatchedGradStats
    from grads_ray.gradients.projection import Projector

    class Unsketched(Projector):
        """Stage 1 only: grad_proj is the per-parameter sketches side by side."""

        def sketch(self, inner):
            return inner

    bergson_run.fresh()  # its cached matrices are in the timed passes' dtype
    col = bergson_run(1)
    device = next(model.parameters()).device
    base = next(n for n, m in model.named_modules() if m is model.base_model)
    prefix = f"{base}." if base else ""
    engine = BatchedGradStats(model, proj_dim=1, proj_rank=proj_dim, fisher_dim=0, fisher_rank=0)
    proj = Unsketched({n: tuple(p.shape) for n, p in engine.params.items()}, 1, proj_dim)
    names = {}
    for name in col.gradients:
        full = f"{prefix}{name}.weight"
        out_f, in_f = engine.params[full].shape
        if proj_dim > min(out_f, in_f):
            continue  # grads-ray's block would be narrower than bergson's: not the same projection
        cfg = bergson_run.cfg
        left, right = (create_module_projection_matrix(name, role, proj_dim, n, torch.float32, device,
                                                       cfg.projection_type, cfg.projection_scale,
                                                       cfg.projection_seed)
                       for role, n in (("left", out_f), ("right", in_f)))  # as its collector makes them
        proj.blocks[full] = (left.double().cpu(), right.double().cpu())
        names[name] = full
    engine.projector = proj
    scores = engine(*batch)
    ours = torch.as_tensor(scores.grad_proj, dtype=torch.float64)
    worst, worst_module = 0.0, None
    for name, full in names.items():
        theirs = col.gradients[name][: len(ours)].to(torch.float64)
        mine = ours[:, proj.offsets[full]]
        rel = float(((mine - theirs).norm(dim=1) / theirs.norm(dim=1).clamp(min=1e-30)).max())
        if rel >= worst:
            worst, worst_module = rel, name
    loss = torch.as_tensor(scores.columns["loss"], dtype=torch.float64)
    their_loss = col.per_doc_losses[: len(loss)].detach().cpu().to(torch.float64)
    loss_err = float(((loss - their_loss).abs() / their_loss.abs().clamp(min=1e-30)).max())
    return {"dtype": str(next(model.parameters()).dtype), "examples": len(ours), "modules": len(names),
            "modules_skipped": len(col.gradients) - len(names), "max_rel_err": worst,
            "worst_module": worst_module, "loss_max_rel_err": loss_err,
            "agree": worst < 1e-4 and loss_err < 1e-4}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 32 short examples: a CPU minute")
    ap.add_argument("--model", default=None, choices=sorted(MODELS), help="default: qwen0.5b on CUDA, small on CPU")
    ap.add_argument("--n", type=int, default=None, help="examples (rounded down to whole batches); default 256")
    ap.add_argument("--length", type=int, default=None, help="T, the longest row; default 512")
    ap.add_argument("--batch", type=int, default=None, help="examples per batch; default 16")
    ap.add_argument("--proj-dim", type=int, default=16, help="bergson's per-module p (p x p per module)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    ap.add_argument("--repeats", type=int, default=None, help="timed passes per side, interleaved (median)")
    ap.add_argument("--skip", default="", help="comma list of sides to skip: bergson,grads_ray,plain")
    ap.add_argument("--no-check", action="store_true", help="skip the exactness check against bergson")
    args = ap.parse_args()

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.dtype == "auto":
        args.dtype = "bfloat16" if device == "cuda" else "float32"
    args.model = args.model or ("tiny" if args.quick else "qwen0.5b" if device == "cuda" else "small")
    n_req = args.n or (32 if args.quick else 256)
    length = args.length or (64 if args.quick else 512)
    bsz = args.batch or (8 if args.quick else 16)
    repeats = args.repeats or (3 if args.quick else 1)
    if device == "cpu":
        torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    dtype = getattr(torch, args.dtype)

    bergson, skipped = (None, "skipped by --skip") if "bergson" in skip else import_bergson()
    if skipped and "bergson" not in skip:
        print(f"# {skipped}: running grads-ray and the plain step only; {INSTALL_HINT}", flush=True)
    elif bergson is not None and getattr(bergson, "__version__", None) != BERGSON_VERSION:
        print(f"# bergson {getattr(bergson, '__version__', '?')} installed; these calls were checked against "
              f"{BERGSON_VERSION}", flush=True)

    model = build_model(args.model, dtype, device)
    vocab = model.config.vocab_size
    batches = [trim(make_batch(bsz, length, vocab, seed=b, device=device)) for b in range(max(1, n_req // bsz))]
    n = len(batches) * bsz
    real = sum(int(m.sum()) for _, _, m in batches)
    n_params = sum(p.numel() for p in model.parameters())
    dev_name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    print(f"# {platform.node()} {dev_name} device={device} dtype={args.dtype} model={args.model} "
          f"params={n_params / 1e6:.2f}M n={n} T={length} B={bsz} real_tokens={real} torch={torch.__version__}"
          + (f" threads={torch.get_num_threads()}" if device == "cpu" else ""), flush=True)

    sides = {}
    if "plain" not in skip:
        def plain(k):
            for b in batches[:k]:
                plain_step(model, *b)
            model.zero_grad(set_to_none=True)
        sides["plain_step"] = plain
    if "grads_ray" not in skip:
        from grads_ray.gradients.engine import BatchedGradStats

        engine = BatchedGradStats(model, proj_dim=512, proj_rank=8, fisher_dim=64, fisher_rank=4)

        def ours(k):
            for b in batches[:k]:
                engine(*b)
        sides["grads_ray"] = ours
    workdir = tempfile.TemporaryDirectory(prefix="bergson_peer_")
    berg = None
    if bergson is not None:
        berg = Bergson(model, batches, args.proj_dim, workdir.name)
        collected = {}

        def theirs(k):
            collected["col"] = berg(k)
        sides["bergson"] = theirs

    times = {name: [] for name in sides}
    peaks = {}
    for fn in sides.values():  # warm-up: one batch each
        fn(1)
    for _ in range(repeats):
        for name, fn in sides.items():
            sync(device)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            fn(len(batches))
            sync(device)
            times[name].append(time.perf_counter() - t0)
            if device == "cuda":
                peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
    rate = {}
    for name, ts in times.items():
        s = statistics.median(ts)
        rate[name] = n / s
        print(f"{name:>11}: {s:8.3f} s  {n / s:10.2f} ex/s  {real / s:12.0f} tok/s"
              + (f"  peak {peaks[name]:.2f} GiB" if name in peaks else ""), flush=True)

    cfg = model.config
    out = {"device": device, "device_name": dev_name, "dtype": args.dtype, "model": args.model,
           "params_m": round(n_params / 1e6, 2), "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers,
           "vocab": vocab, "n": n, "length": length, "batch": bsz, "real_tokens": real, "repeats": repeats,
           "torch": torch.__version__}
    if device == "cpu":
        out["threads"] = torch.get_num_threads()
    for name in ("plain_step", "grads_ray", "bergson"):
        out[f"{name}_examples_per_s"] = round(rate[name], 3) if name in rate else None
    if "grads_ray" in rate and "plain_step" in rate:
        out["grads_ray_cost_vs_plain_step"] = round(rate["plain_step"] / rate["grads_ray"], 3)
    out["bergson"] = None
    if berg is not None:
        col = collected["col"]
        out["bergson"] = {"version": getattr(bergson, "__version__", None), "proj_dim": args.proj_dim,
                          "modules": len(col.gradients),
                          "dims_per_example": sum(v.shape[1] for v in col.gradients.values())}
        out["speedup_vs_bergson"] = round(rate["grads_ray"] / rate["bergson"], 3) if "grads_ray" in rate else None
        if "plain_step" in rate:
            out["bergson_cost_vs_plain_step"] = round(rate["plain_step"] / rate["bergson"], 3)
    else:
        out["bergson_skipped"] = skipped
        out["speedup_vs_bergson"] = None
    if peaks:
        out["peak_gib"] = {k: round(v, 2) for k, v in peaks.items()}
    out["exactness"] = None
    if berg is not None and not args.no_check:
        model.float()  # lossless from bfloat16/float16; the check wants float32 arithmetic on both sides
        out["exactness"] = check_exact(model, berg, batches[0], args.proj_dim)
        print(f"# exactness vs bergson (float32, first batch, {out['exactness']['modules']} modules): max "
              f"relative error {out['exactness']['max_rel_err']:.2e}", flush=True)
    out["computes"] = COMPUTES
    workdir.cleanup()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
