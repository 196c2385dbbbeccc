"""``zoo generate NAME_OR_DIR --prompt "..."``: stream a continuation from a zoo language model.

NAME_OR_DIR is a folder in the Hugging Face LFM2 layout (config.json + *.safetensors + tokenizer.json; what
``zoo fit -c lfm2/stdlib_tiny`` exports to ``<log_dir>/hf`` and what ``LiquidAI/LFM2-*`` repositories hold), or a
registered name with released weights (``lfm2_350m``; its files are fetched from the Hugging Face Hub once).
Tokens are printed as soon as they are produced; speed goes to stderr.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


class TextStreamer:
    """Prints the text of newly generated ids as they arrive (``put`` / ``end``, like transformers' streamers).

    The first ``put`` (the prompt) is skipped. Text is flushed only once it decodes to complete characters, so
    multi-byte UTF-8 characters split across byte-level tokens print correctly.
    """

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.ids: list[int] = []
        self.printed = 0
        self.seen_prompt = False
        self.count = 0
        self.first_token_time: float | None = None

    def put(self, ids: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self.ids += [int(i) for i in ids.reshape(-1)[:1]]
        self.count += 1
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.out.write(text[self.printed:] + "\n")
        self.out.flush()


def _resolve(source: str, cache_dir: str | None) -> Path:
    p = Path(source).expanduser()
    if p.exists():
        if not p.is_dir():
            raise SystemExit(f"zoo generate: {p} is a file; pass the folder holding config.json, *.safetensors and tokenizer.json")
        return p
    import zoo
    from zoo.registry import resolve_cfg

    if not zoo.is_model(source):
        raise SystemExit(f"zoo generate: {source!r} is neither a folder nor a registered model (see `zoo list`)")
    entry, tag, cfg = resolve_cfg(source)
    if cfg.task != "text-generation":
        raise SystemExit(f"zoo generate: {entry.name} is a {cfg.task} model, not a language model")
    if cfg.source is None or not cfg.source.hf_hub_id:
        raise SystemExit(f"zoo generate: {entry.name}{'.' + tag if tag else ''} has no released weights; "
                         "pass a trained folder instead")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(cfg.source.hf_hub_id, cache_dir=cache_dir,
                                      allow_patterns=["config.json", "*.safetensors", "tokenizer*.json"]))
    except Exception as e:  # offline, gated, ...
        raise SystemExit(
            f"zoo generate: could not fetch {cfg.source.hf_hub_id} ({e}). Download the repository by hand "
            f"(config.json, model.safetensors, tokenizer.json) and pass its folder."
        ) from e


def _folder_loader(folder: Path):
    """The family loader for an HF-layout folder, chosen by its config.json ``model_type``."""
    import json

    cfg = folder / "config.json"
    mt = json.loads(cfg.read_text()).get("model_type") if cfg.exists() else None
    if mt in ("nemotron_flash", "zoo_nemotron_flash"):
        from zoo.language.nemotron_flash import load_pretrained
    else:
        from zoo.language.lfm2 import load_pretrained
    return load_pretrained


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zoo generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="folder (HF LFM2 layout with tokenizer.json) or registered name with weights")
    ap.add_argument("--prompt", required=True, help="text to continue")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of the folder's")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--cache-dir", default=None, help="Hugging Face cache for registered names")
    ap.add_argument("--eager", action="store_true",
                    help="decode through the eager reference path (every token through forward) instead of the fast "
                         "path (packed projections + operator steps; same tokens)")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    from tokenizers import Tokenizer

    folder = _resolve(args.model, args.cache_dir)
    load_pretrained = _folder_loader(folder)
    tok_file = Path(args.tokenizer) if args.tokenizer else folder / "tokenizer.json"
    if not tok_file.exists():
        raise SystemExit(f"zoo generate: no tokenizer at {tok_file}; pass --tokenizer PATH/tokenizer.json")
    tokenizer = Tokenizer.from_file(str(tok_file))
    model = load_pretrained(folder, dtype=getattr(torch, args.dtype))
    model.tokenizer = tokenizer  # what model.save_pretrained() would write next to the weights
    model.set_decode_path("eager" if args.eager else "fast")
    ids = tokenizer.encode(args.prompt).ids
    if not ids:
        raise SystemExit("zoo generate: the prompt encodes to no tokens")
    if max(ids) >= model.config.vocab_size:
        raise SystemExit(
            f"zoo generate: the tokenizer produced id {max(ids)} but the model has {model.config.vocab_size} "
            f"tokens: tokenizer and model do not belong together"
        )
    max_new = min(args.max_new_tokens, model.config.max_position_embeddings - len(ids))
    if max_new < args.max_new_tokens:
        print(f"[zoo generate] context is {model.config.max_position_embeddings} tokens: generating {max_new}",
              file=sys.stderr)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    streamer = TextStreamer(tokenizer)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed)
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=max_new, do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else 1.0, top_k=args.top_k, top_p=args.top_p,
        streamer=streamer, generator=gen,
    )
    t1 = time.perf_counter()
    n = out.shape[1] - len(ids)
    print_timings(len(ids), n, t0, streamer.first_token_time or t1, t1,
                  f"{'eager' if args.eager else 'fast'} path, {args.dtype}, {torch.get_num_threads()} threads")
    return 0


def print_timings(prompt: int, new: int, t0: float, t_first: float, t1: float, how: str, out=None) -> None:
    """llama.cpp-style timings: the prompt (prefill, up to the first new token) and the decode of the others."""
    out = out or sys.stderr
    pre = t_first - t0
    print(f"[zoo generate] prefill: {prompt} tokens in {pre * 1000:.1f} ms ({prompt / pre:.2f} tokens/s)", file=out)
    if new > 1:
        dec = t1 - t_first
        print(f"[zoo generate] decode:  {new - 1} tokens in {dec * 1000:.1f} ms ({(new - 1) / dec:.2f} tokens/s, "
              f"{dec * 1000 / (new - 1):.1f} ms/token)", file=out)
    print(f"[zoo generate] total:   {prompt + new} tokens in {(t1 - t0) * 1000:.1f} ms ({how})", file=out)


if __name__ == "__main__":
    sys.exit(main())
