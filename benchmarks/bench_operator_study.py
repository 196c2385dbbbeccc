"""Operator-choice study (issue 17): all-attention vs LFM2-style (conv + GQA) vs Nemotron-Flash-style (DeltaNet +
Mamba2 + GQA) vs Mamba2-only, at equal parameter count and equal training budget on the stdlib corpus.

    nice python benchmarks/bench_operator_study.py                # the committed figures (see MODEL_CARD.md)
    python scripts/make_model_card.py                             # regenerates the MODEL_CARD table from the JSON

Every arm is the shared hybrid decoder (:class:`zoo.language.hybrid.HybridLM`) with 8 mixers, each followed by a
SwiGLU FFN, at the hidden size / heads of ``recipes/nemotron_flash/operator_study.yaml``; the FFN width of each arm is
chosen (multiple of 32) so that its parameter count is closest to ``--params`` (default 10M). Each arm trains for the
recipe's ``trainer.max_steps`` AdamW updates (its lr, weight decay, warm-up; cosine to ``min_lr``; clip 1.0) on the
*same* random windows of the byte-level stdlib train split (:func:`zoo.language.operator_search.train_and_score`),
then is scored on the held-out files.

Measured, per arm (batch 1, fp32, ``--threads`` intra-op threads, rounds interleaved across arms so machine load
hits every arm alike, medians):

- bits/byte: held-out validation windows of the recipe's ``seq_len`` (sum of NLL in bits / sum of bytes);
- prefill tok/s at C: a C-token prompt through the model with a fresh cache, next-token logits only, C / time;
- decode tok/s at C: single-token cached steps after a C-token prompt;
- cache bytes: decode state after a C-token prompt (KV entries in use, conv windows, recurrent states); "per token"
  is the growth from the shortest to the longest context divided by the extra tokens, "fixed" the rest.

Writes ``--json`` (default ``benchmarks/results/operator_study.json``, :func:`zoo.bench.write_results`: command, date,
machine, load average, versions, settings; table ``study`` is the MODEL_CARD table, ``raw`` every figure unrounded).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "nemotron_flash" / "operator_study.yaml"
SHORT = {"full_attention": "A", "conv": "C", "deltanet": "D", "mamba2": "M"}
RESULTS = ROOT / "benchmarks" / "results" / "operator_study.json"
ARMS = {  # name -> (label, layer_types)
    "attention": ("all-attention (GQA)", ["full_attention"] * 8),
    "lfm2": ("LFM2-style (conv + GQA)",
             ["conv", "conv", "full_attention", "conv", "conv", "conv", "full_attention", "conv"]),
    "nemotron_flash": ("Nemotron-Flash-style (DeltaNet + Mamba2 + GQA)",
                       ["deltanet", "mamba2", "full_attention", "mamba2", "deltanet", "mamba2", "deltanet", "mamba2"]),
    "mamba2": ("Mamba2-only", ["mamba2"] * 8),
}


def load_recipe(path: Path) -> dict:
    import yaml

    doc = yaml.safe_load(path.read_text())
    m, d = doc["model"]["init_args"], doc["data"]["init_args"]
    return {
        "model_args": dict(m["model_args"]), "lr": float(m["lr"]), "weight_decay": float(m["weight_decay"]),
        "warmup_steps": int(m.get("warmup_steps", 0)), "min_lr": float(m.get("min_lr", 0.0)),
        "steps": int(doc["trainer"]["max_steps"]), "seq_len": int(d["seq_len"]), "batch_size": int(d["batch_size"]),
        "val_tokens": int(d["val_tokens"]), "max_bytes": d.get("max_bytes"), "seed": int(doc.get("seed_everything", 0)),
    }


def arm_config(layer_types, model_args: dict, ffn: int, max_positions: int, vocab: int):
    from zoo.language.lfm2 import hybrid_config_from_lfm2

    args = {**model_args, "layer_types": layer_types, "intermediate_size": ffn, "block_auto_adjust_ff_dim": False,
            "max_position_embeddings": max(max_positions, int(model_args.get("max_position_embeddings", 0))),
            "vocab_size": vocab, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    return hybrid_config_from_lfm2(**args)


def solve_ffn(layer_types, model_args: dict, target: float, max_positions: int, vocab: int) -> tuple[int, int]:
    """(FFN width, params): the multiple of 32 whose parameter count is closest to ``target``."""
    from zoo.language.operator_search import count_params

    best = None
    for ffn in range(32, 16 * int(model_args["hidden_size"]) + 1, 32):
        n = count_params(arm_config(layer_types, model_args, ffn, max_positions, vocab))
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (ffn, n)
        if n > target:
            break
    if abs(best[1] - target) > 0.05 * target:
        raise ValueError(f"no FFN width brings {layer_types} within 5% of {target:,.0f} parameters at hidden "
                         f"{model_args['hidden_size']} (closest: {best[1]:,}); change --params or the recipe's width")
    return best


def cache_bytes(cache) -> int:
    """Bytes of decode state held by a hybrid cache (KV entries in use, conv windows, recurrent states)."""
    from zoo.language.hybrid import KVBuffer

    n = 0
    for st in cache.layers:
        if st is None:
            continue
        if isinstance(st, KVBuffer):
            if st.k is not None:
                per_pos = (st.k[:, :, :1].numel() * st.k.element_size()) * 2
                n += per_pos * st.length
        elif isinstance(st, torch.Tensor):
            n += st.numel() * st.element_size()
        elif hasattr(st, "nbytes"):
            n += int(st.nbytes())
        else:
            raise TypeError(f"cannot size a cache state of type {type(st).__name__}")
    return n


@torch.inference_mode()
def speed(models: dict, contexts: list[int], decode_steps: int, repeats: int, vocab: int) -> dict:
    """Prefill / decode tok/s and cache bytes per arm and context, rounds interleaved across arms."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (1, max(contexts)), generator=g)
    pre = {(a, c): [] for a in models for c in contexts}
    dec = {(a, c): [] for a in models for c in contexts}
    mem = {}
    for r in range(repeats + 1):  # round 0 warms up
        for c in contexts:
            for arm, model in models.items():
                cache = model.new_cache(c + decode_steps + 1)
                t = time.perf_counter()
                tok = model(prompt[:, :c], cache=cache, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)
                tp = time.perf_counter() - t
                mem[(arm, c)] = cache_bytes(cache)
                steps = []
                for _ in range(decode_steps):
                    t = time.perf_counter()
                    tok = model(tok, cache=cache)[:, -1].argmax(-1, keepdim=True)
                    steps.append(time.perf_counter() - t)
                if r:
                    pre[(arm, c)].append(tp)
                    dec[(arm, c)] += steps
    out = {}
    lo, hi = min(contexts), max(contexts)
    for arm in models:
        row = {}
        for c in contexts:
            row[f"prefill_tok_s@{c}"] = c / statistics.median(pre[(arm, c)])
            row[f"decode_tok_s@{c}"] = 1 / statistics.median(dec[(arm, c)])
            row[f"cache_bytes@{c}"] = mem[(arm, c)]
        per_tok = (mem[(arm, hi)] - mem[(arm, lo)]) / max(1, hi - lo)
        row["cache_bytes_per_token"] = per_tok
        row["cache_bytes_fixed"] = mem[(arm, lo)] - per_tok * lo
        row[f"decode_ratio_{hi}_vs_{lo}"] = row[f"decode_tok_s@{hi}"] / row[f"decode_tok_s@{lo}"]
        out[arm] = row
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=str(RECIPE))
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    p.add_argument("--params", type=float, default=10e6, help="parameter count every arm is matched to")
    p.add_argument("--steps", type=int, default=None, help="override the recipe's trainer.max_steps")
    p.add_argument("--contexts", default="128,2048", help="prompt lengths for the speed and cache figures")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for timing (training uses --train-threads)")
    p.add_argument("--train-threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="smoke run: hidden 64, 2 heads, 0.5M params, 2 steps")
    p.add_argument("--files", nargs="*", default=None, help="text files / globs instead of the stdlib corpus")
    p.add_argument("--json", default=str(RESULTS))
    p.add_argument("--models-dir", default=None,
                   help="keep trained arms here (<arm>.pt state dict + <arm>.json figures) and reuse those found, so "
                        "arms can train in parallel processes (--train-only) before one process times them all")
    p.add_argument("--train-only", action="store_true", help="train (into --models-dir) and stop: no timing, no JSON")
    a = p.parse_args(argv)

    from zoo.language import operator_search as search

    known = search.mixer_operators()  # also registers DeltaNet / Mamba2 (zoo.layers.recurrent_mixers)
    rec = load_recipe(Path(a.recipe))
    arms = [x for x in a.arms.split(",") if x]
    bad = [x for x in arms if x not in ARMS]
    if bad:
        p.error(f"unknown arm(s) {bad}; choose from {', '.join(ARMS)}")
    missing = sorted({t for x in arms for t in ARMS[x][1]} - set(known))
    if missing:
        p.error(f"operator(s) {missing} are not registered in this checkout (known: {known})")
    contexts = sorted({int(c) for c in a.contexts.split(",")})
    if a.tiny:
        rec["model_args"].update(hidden_size=64, num_attention_heads=2, num_key_value_heads=1)
        rec.update(steps=2, seq_len=16, batch_size=2, val_tokens=64)
        a.params = min(a.params, 5e5)
    if a.steps is not None:
        rec["steps"] = a.steps
    max_pos = max(contexts) + a.decode_steps + 1
    vocab = search.BYTE_VOCAB
    data = search.CorpusData.from_text(rec["seq_len"], rec["val_tokens"], rec["max_bytes"], a.files)

    if a.train_only and not a.models_dir:
        p.error("--train-only needs --models-dir (where the trained arms are kept)")
    models_dir = Path(a.models_dir) if a.models_dir else None
    rows, models = {}, {}
    for arm in arms:
        label, layer_types = ARMS[arm]
        ffn, n = solve_ffn(layer_types, rec["model_args"], a.params, max_pos, vocab)
        cfg = arm_config(layer_types, rec["model_args"], ffn, max_pos, vocab)
        torch.manual_seed(rec["seed"])
        torch.set_num_threads(a.train_threads)
        model = search.build_model(cfg)
        if models_dir is not None and (models_dir / f"{arm}.json").exists():
            row = json.loads((models_dir / f"{arm}.json").read_text())
            if row["params"] != n or row["steps"] != rec["steps"]:
                p.error(f"{models_dir}/{arm}.json was trained with other settings ({row['params']} params, "
                        f"{row['steps']} steps); use another --models-dir")
            model.load_state_dict(torch.load(models_dir / f"{arm}.pt", weights_only=True))
            print(f"[{arm}] trained weights from {models_dir}: bits/byte {row['bpb']:.4f}", file=sys.stderr)
            rows[arm], models[arm] = row, model.eval()
            continue
        print(f"[{arm}] {label}: hidden {cfg.hidden_size}, FFN {ffn}, {n:,} params; training {rec['steps']} steps",
              file=sys.stderr, flush=True)
        res = search.train_and_score(model, data, steps=rec["steps"], batch_size=rec["batch_size"], lr=rec["lr"],
                                     warmup_steps=rec["warmup_steps"], weight_decay=rec["weight_decay"],
                                     seed=rec["seed"], min_lr=rec["min_lr"])
        print(f"[{arm}] bits/byte {res['bpb']:.4f} ({res['train_seconds']:.0f} s)", file=sys.stderr, flush=True)
        rows[arm] = {"arm": arm, "label": label, "layer_types": layer_types, "hidden_size": cfg.hidden_size,
                     "ffn": ffn, "params": n, "bpb": res["bpb"], "train_loss": res["train_loss"],
                     "train_seconds": res["train_seconds"], "steps": rec["steps"]}
        models[arm] = model.eval()
        if models_dir is not None:
            models_dir.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), models_dir / f"{arm}.pt.tmp")
            os.replace(models_dir / f"{arm}.pt.tmp", models_dir / f"{arm}.pt")
            (models_dir / f"{arm}.json").write_text(json.dumps(rows[arm]))  # written last: marks the arm complete
    if a.train_only:
        return 0
    torch.set_num_threads(a.threads)
    print(f"timing {', '.join(arms)} at contexts {contexts} ...", file=sys.stderr, flush=True)
    for arm, figures in speed(models, contexts, a.decode_steps, a.repeats, vocab).items():
        rows[arm].update(figures)

    from zoo import bench

    lo, hi = min(contexts), max(contexts)
    results = [rows[x] for x in arms]
    columns = ["Arm", "Mixers (8 layers, each + SwiGLU)", "Params (M)", "Held-out bits/byte",
               f"Prefill tok/s @{lo} / @{hi}", f"Decode tok/s @{lo} / @{hi}", f"Decode @{hi} / @{lo}",
               "Cache bytes / token", "Fixed state (KiB)"]
    table = [[r["label"], " ".join(SHORT.get(t, t) for t in r["layer_types"]), round(r["params"] / 1e6, 2),
              round(r["bpb"], 3), f"{r[f'prefill_tok_s@{lo}']:.0f} / {r[f'prefill_tok_s@{hi}']:.0f}",
              f"{r[f'decode_tok_s@{lo}']:.1f} / {r[f'decode_tok_s@{hi}']:.1f}",
              round(r[f"decode_ratio_{hi}_vs_{lo}"], 2), round(r["cache_bytes_per_token"]),
              round(r["cache_bytes_fixed"] / 1024, 1)] for r in results]
    raw_cols = list(results[0])
    settings = {"recipe": os.path.relpath(a.recipe, ROOT), **{k: v for k, v in rec.items() if k != "model_args"},
                "model_args": rec["model_args"], "params_target": a.params, "contexts": contexts,
                "decode_steps": a.decode_steps, "repeats": a.repeats, "threads": a.threads,
                "train_threads": a.train_threads, "unigram_bpb": data.unigram_bpb, "tiny": a.tiny}
    out = bench.write_results(
        a.json, {"study": {"columns": columns, "rows": table},
                 "raw": {"columns": raw_cols, "rows": [[" ".join(r[c]) if isinstance(r[c], list) else r[c]
                                                        for c in raw_cols] for r in results]}},
        command="python benchmarks/bench_operator_study.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        settings=settings,
        notes=f"fp32, batch 1, {a.threads} intra-op thread(s), rounds interleaved across arms; the machine was shared "
              f"(load average in 'machine'), so compare arms with each other, not with other runs",
    )
    print(f"{'arm':<16}{'params':>11}{'bpb':>8}{f'prefill@{lo}':>13}{f'prefill@{hi}':>13}{f'decode@{lo}':>12}"
          f"{f'decode@{hi}':>12}{'B/token':>10}")
    for r in results:
        print(f"{r['arm']:<16}{r['params']:>11,}{r['bpb']:>8.3f}{r[f'prefill_tok_s@{lo}']:>13.0f}"
              f"{r[f'prefill_tok_s@{hi}']:>13.0f}{r[f'decode_tok_s@{lo}']:>12.1f}{r[f'decode_tok_s@{hi}']:>12.1f}"
              f"{r['cache_bytes_per_token']:>10.0f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
