"""Build the offline English corpus, tokenizer and token files for edgeprism's default model.

The default model ships inside the package and nothing may be downloaded at run time, so its
training data must come from somewhere reproducible without the internet at large: Debian
packages fetched with `apt-get download` (the Python 3.11 HTML documentation, the GCIDE, i.e.
Webster's 1913 dictionary, and the Linux man pages, rendered with groff). Every step is
deterministic for a given set of package versions (recorded in corpus_stats.json).

Steps (each is skipped when its output exists, unless --force):

1. download and extract the .deb files under DATA/corpus/
2. clean the sources into documents, split them into train / held-out by a hash of a group
   key (a docs page, a headword, a man page) so near-duplicates never straddle the split, and
   write DATA/corpus/{train,heldout}.jsonl in a hash-shuffled order
3. train a byte-level BPE tokenizer on the train split: DATA/tokenizer/ (Hugging Face layout)
4. tokenize both splits into DATA/{train,heldout}.u16 (documents followed by <|endoftext|>)
5. write the small text slices that ship with the package: edgeprism/data/{heldout,calib}.txt
6. write DATA/corpus_stats.json (always rewritten; it is cheap)

Usage: python scripts/build_corpus.py [--data DIR] [--force]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("python3.11-doc", "dict-gcide", "manpages", "manpages-dev")
PYDOC_DIR = "usr/share/doc/python3.11/html"
GCIDE_DICT = "usr/share/dictd/gcide.dict.dz"
GCIDE_INDEX = "usr/share/dictd/gcide.index"
MAN_DIR = "usr/share/man"

EOS = "<|endoftext|>"
VOCAB_SIZE = 8192
MODEL_MAX_LENGTH = 1024
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

HELDOUT_PER_MILLE = 20  # 2 % of the groups are held out
MAX_TRAIN_BYTES = 36_000_000  # train.u16 travels to the GPU box with the repo under a 64 MiB cap
HELDOUT_TXT_CHARS = 128_000
CALIB_TXT_CHARS = 100_000
PYDOC_MIN_CHARS = 120
GCIDE_MIN_CHARS = 20
MAN_MIN_CHARS = 200
MAN_MAX_NON_ASCII = 0.01  # above this a page is a character-set table (iso_8859-1(7) etc.), not prose


@dataclass(frozen=True)
class Document:
    """One training document; `group` decides the split, `doc_id` is unique and stable."""

    doc_id: str
    group: str
    source: str
    text: str


def stable_hash(key: str) -> int:
    """A hash that does not depend on PYTHONHASHSEED, so splits and order are reproducible."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def split_of(group: str) -> str:
    """Held-out membership is a function of the group key alone."""
    return "heldout" if stable_hash("split:" + group) % 1000 < HELDOUT_PER_MILLE else "train"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file so an interrupted run never leaves a plausible-looking output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# --------------------------------------------------------------------------- step 1: packages


def fetch_packages(corpus_dir: Path, force: bool) -> Path:
    """Download the .debs with apt-get and extract them; returns the extraction root."""
    root = corpus_dir / "root"
    done = corpus_dir / "extracted.ok"
    if done.exists() and not force:
        return root
    debs = corpus_dir / "debs"
    shutil.rmtree(debs, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    debs.mkdir(parents=True)
    subprocess.run(["apt-get", "download", *PACKAGES], cwd=debs, check=True)
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    versions = sorted(p.name for p in debs.glob("*.deb"))
    atomic_write_text(done, "\n".join(versions) + "\n")
    return root


# --------------------------------------------------------------------------- step 2: cleaning

_BLOCK_TAGS = frozenset(
    "p div pre h1 h2 h3 h4 h5 h6 ul ol li dl dt dd table tr blockquote section figure caption br hr".split()
)
_SKIP_TAGS = frozenset({"script", "style"})
_SKIP_CLASSES = frozenset({"headerlink", "toctree-wrapper", "contents"})
_PRE_MARK = "\x01"  # prefixes lines that came from <pre>, whose indentation must survive
_DOC_BREAK = "\x00"  # emitted before h1/h2 so one HTML page becomes one document per section
_SKIPPED_PAGES = re.compile(r"^(genindex.*|py-modindex|search|contents|download|index)\.html$")


class _SphinxText(HTMLParser):
    """Extracts readable text from the main body of a Sphinx page.

    Sidebars, navigation bars, footers, permalink markers and table-of-contents blocks are
    dropped: they repeat on every page and would teach the model boilerplate.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._body_divs = 0  # open <div> count inside the main body; 0 = outside it
        self._skip: tuple[str, int] | None = None  # (tag, nesting) of the element being skipped
        self._pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        classes = set((attr.get("class") or "").split())
        if self._skip is not None:
            if tag == self._skip[0]:
                self._skip = (tag, self._skip[1] + 1)
            return
        if not self._body_divs:
            if tag == "div" and "body" in classes and attr.get("role") == "main":
                self._body_divs = 1
            return
        if tag in _SKIP_TAGS or classes & _SKIP_CLASSES:
            self._skip = (tag, 1)
            return
        if tag == "div":
            self._body_divs += 1
        if tag in ("h1", "h2"):
            self.parts.append(_DOC_BREAK)
        if tag == "pre":
            self._pre += 1
            self.parts.append("\n" + _PRE_MARK)
        elif tag in ("td", "th"):
            self.parts.append(" ")
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if self._skip is not None:
            if tag == self._skip[0]:
                depth = self._skip[1] - 1
                self._skip = (tag, depth) if depth else None
            return
        if not self._body_divs:
            return
        if tag == "div":
            self._body_divs -= 1
        if tag == "pre":
            self._pre -= 1
        if tag in ("p", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "dl", "ul", "ol", "table"):
            self.parts.append("\n\n")
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._skip is not None or not self._body_divs:
            return
        if self._pre:
            self.parts.append(data.replace("\n", "\n" + _PRE_MARK))
        else:
            self.parts.append(re.sub(r"\s+", " ", data))


def _tidy_lines(text: str) -> str:
    """Strip prose lines, keep code indentation, collapse runs of blank lines."""
    lines = []
    for line in text.split("\n"):
        if line.startswith(_PRE_MARK):
            lines.append(line.replace(_PRE_MARK, "").rstrip())
        else:
            lines.append(re.sub(r" {2,}", " ", line).strip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def normalize(text: str) -> str:
    """Unicode NFC, no non-breaking or zero-width spaces, no control characters but newline."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\xa0", " ").replace("\u200b", "").replace("\ufeff", "")
    return "".join(ch for ch in text if ch == "\n" or unicodedata.category(ch)[0] != "C")


def pydoc_documents(root: Path) -> Iterator[Document]:
    """One document per h1/h2 section of every content page of the Python docs."""
    html_root = root / PYDOC_DIR
    for page in sorted(html_root.rglob("*.html")):
        rel = page.relative_to(html_root).as_posix()
        if _SKIPPED_PAGES.match(rel):
            continue
        parser = _SphinxText()
        parser.feed(page.read_text(encoding="utf-8"))
        parser.close()
        sections = "".join(parser.parts).split(_DOC_BREAK)
        for index, raw in enumerate(sections):
            text = normalize(_tidy_lines(raw))
            if len(text) >= PYDOC_MIN_CHARS:
                yield Document(f"pydoc:{rel}#{index}", f"pydoc:{rel}", "python-docs", text)


_DICTD_B64 = {ch: i for i, ch in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}

_COMBINING = {"'": "\u0301", "`": "\u0300", '"': "\u0308", "~": "\u0303", "^": "\u0302", ",": "\u0327"}
_NAMED_CODES = {
    "ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "deg": "°", "eth": "ð", "thorn": "þ", "sect": "§",
    "pounds": "£", "root": "√", "yogh": "ȝ", "imac": "i", "asl": "a", "aum": "a", "add": "a", "udd": "u",
    "ng": "ng", "th": "th", "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "Delta": "Δ",
    "epsilon": "ε", "theta": "θ", "lambda": "λ", "mu": "μ", "pi": "π", "sigma": "σ", "phi": "φ",
    "chi": "χ", "psi": "ψ", "omega": "ω", "Omega": "Ω",
}
_SOURCE_TAG = re.compile(r"\s*\[[^\[\]]*(?:Webster|WordNet|PJC|Century|RHUD|RDH|MW10|Chambers)[^\[\]]*\]")
_PRONUNCIATION = re.compile(r"\s*\\[^\\\n]*\\")
_PRONUNCIATION_GLUED = re.compile(r"\s*\\[^\\\n]*\\(?=\w)")  # keeps "n." of "\word\n." apart
_RESPELLING = re.compile(r"\s*\((?=[^()\s]*(?:\*|\[[^\]\s]{1,5}\]|\"))[^()\s]+\)")


def _decode_dictd_number(field: str) -> int:
    value = 0
    for ch in field:
        value = value * 64 + _DICTD_B64[ch]
    return value


def _gcide_code(match: re.Match[str]) -> str:
    """Turn GCIDE's ASCII character codes ([`e], [ae], [=a]...) into plain Unicode."""
    code = match.group(1)
    if code in _NAMED_CODES:
        return _NAMED_CODES[code]
    if len(code) == 2 and code[1].isalpha() and code[0] in _COMBINING:
        return unicodedata.normalize("NFC", code[1] + _COMBINING[code[0]])
    if len(code) == 2 and code[1].isalpha() and code[0] in "=-.*":  # pronunciation marks
        return code[1]
    if re.fullmatch(r"[a-zA-Z]{1,2}\^", code):  # breve marks
        return code[:-1]
    return match.group(0)  # usage labels such as [Obs.] or [R.] stay


def clean_gcide_entry(raw: str) -> str:
    """Readable text from one dictd entry: no pronunciations, markup or source tags; reflowed."""
    text = _PRONUNCIATION_GLUED.sub(" ", raw)
    text = _PRONUNCIATION.sub("", text)
    text = _RESPELLING.sub("", text)
    text = _SOURCE_TAG.sub("", text)
    text = re.sub(r"\[([^\[\]\s]{1,7})\]", _gcide_code, text)
    text = text.replace("{", "").replace("}", "").replace("`", "")
    text = re.sub(r"\S*\?{2,}\S*", "", text)  # Greek words the conversion lost as '?????'
    text = re.sub(r"\s\?+(?=[\s,;:\]])|\s\?+\.", "", text)
    paragraphs = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
    return normalize("\n".join(p for p in paragraphs if p))


def gcide_documents(root: Path) -> Iterator[Document]:
    """One document per dictionary entry, located through the dictd index."""
    data = gzip.open(root / GCIDE_DICT, "rb").read()
    spans: dict[tuple[int, int], str] = {}
    for line in (root / GCIDE_INDEX).read_text(encoding="utf-8").splitlines():
        headword, offset, length = line.split("\t")
        span = (_decode_dictd_number(offset), _decode_dictd_number(length))
        if not headword.startswith("00-database") and span not in spans:
            spans[span] = headword
    for (offset, length), headword in sorted(spans.items()):
        raw = data[offset : offset + length].decode("utf-8", errors="replace").replace("\ufffd", "")
        text = clean_gcide_entry(raw)
        if len(text) >= GCIDE_MIN_CHARS:
            key = headword.lower()
            yield Document(f"gcide:{offset}", f"gcide:{key}", "gcide", text)


_BOX_DRAWING = frozenset("─│┌┐└┘├┤┬┴┼═║")
_GROFF = ("groff", "-Kutf-8", "-t", "-man", "-Tutf8", "-rLL=2000n", "-P-c", "-P-b", "-P-u")  # no wrapping, no overstrike


def render_manpage(page: Path) -> str:
    """Plain text of one man page. The line length is so large that groff never wraps or
    justifies, which would otherwise put runs of padding spaces into the prose."""
    source = gzip.open(page, "rb").read()
    result = subprocess.run(_GROFF, input=source, capture_output=True, check=True)
    return result.stdout.decode("utf-8", errors="replace")


def clean_manpage(rendered: str) -> str:
    """Drop the running header and footer and table rules, un-indent the body by groff's 7 columns."""
    lines = rendered.strip("\n").split("\n")[1:-1]
    kept = []
    for line in lines:
        if line.strip() and set(line.strip()) <= _BOX_DRAWING:
            continue
        line = line.replace("│", "|").rstrip()
        line = line[7:] if line.startswith(" " * 7) else line
        kept.append(re.sub(r"(?<=\S) {2,}", " ", line))
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()
    return normalize(text.replace("\ufffd", "").replace("\u2010", "-").replace("\u2212", "-"))


def _is_alias(page: Path) -> bool:
    """A page whose whole source is `.so other-page`; rendering it would duplicate that page."""
    return gzip.open(page, "rb").read(4) == b".so "


def manpage_documents(root: Path) -> Iterator[Document]:
    """One document per man page; aliases (symlinks and `.so` pages) are skipped."""
    man_root = root / MAN_DIR
    pages = [p for p in sorted(man_root.glob("man*/*.gz")) if not p.is_symlink() and not _is_alias(p)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for page, rendered in zip(pages, pool.map(render_manpage, pages)):
            text = clean_manpage(rendered)
            rel = page.relative_to(man_root).as_posix()
            non_ascii = sum(ord(ch) > 127 for ch in text)
            if len(text) >= MAN_MIN_CHARS and non_ascii <= MAN_MAX_NON_ASCII * len(text):
                yield Document(f"man:{rel}", f"man:{rel}", "manpages", text)


def write_documents(root: Path, corpus_dir: Path, force: bool) -> dict[str, Path]:
    """Clean all sources, split by group hash, store each split as JSON lines in hash order."""
    paths = {name: corpus_dir / f"{name}.jsonl" for name in ("train", "heldout")}
    if all(p.exists() for p in paths.values()) and not force:
        return paths
    splits: dict[str, list[Document]] = {"train": [], "heldout": []}
    for producer in (pydoc_documents, gcide_documents, manpage_documents):
        for doc in producer(root):
            splits[split_of(doc.group)].append(doc)
    for name, docs in splits.items():
        docs.sort(key=lambda d: (stable_hash("order:" + d.doc_id), d.doc_id))
        lines = (json.dumps(asdict(d), ensure_ascii=False) for d in docs)
        atomic_write_text(paths[name], "\n".join(lines) + "\n")
    return paths


def read_documents(path: Path) -> list[Document]:
    with path.open(encoding="utf-8") as f:
        return [Document(**json.loads(line)) for line in f]


# --------------------------------------------------------------------------- step 3: tokenizer


def train_tokenizer(train_docs: list[Document], tokenizer_dir: Path, force: bool) -> Path:
    """Byte-level BPE (GPT-2 style pre-tokenization), so every string round-trips exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    path = tokenizer_dir / "tokenizer.json"
    if path.exists() and not force:
        return path
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((d.text for d in train_docs), trainer=trainer, length=len(train_docs))
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    write_hf_tokenizer_files(tokenizer_dir)
    atomic_write_text(path, tokenizer.to_str(pretty=True))
    return path


def write_hf_tokenizer_files(tokenizer_dir: Path) -> None:
    """tokenizer_config.json and special_tokens_map.json, written by hand so they do not depend
    on which transformers version happens to be installed."""
    special = {"bos_token": EOS, "eos_token": EOS, "pad_token": EOS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "unk_token": None,
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            "0": {"content": EOS, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        },
        "chat_template": CHAT_TEMPLATE,
    }
    atomic_write_text(tokenizer_dir / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    atomic_write_text(tokenizer_dir / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")


# --------------------------------------------------------------------------- step 4: token ids


def encode_documents(tokenizer_path: Path, docs: list[Document]) -> list[np.ndarray]:
    """Token ids per document, each followed by the <|endoftext|> id."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    eos_id = tokenizer.token_to_id(EOS)
    out: list[np.ndarray] = []
    for start in range(0, len(docs), 4096):
        batch = tokenizer.encode_batch([d.text for d in docs[start : start + 4096]], add_special_tokens=False)
        out.extend(np.array([*enc.ids, eos_id], dtype=np.uint16) for enc in batch)
    return out


def write_tokens(tokenizer_path: Path, docs: list[Document], path: Path, max_bytes: int | None, force: bool) -> None:
    """Concatenate whole documents; stop before max_bytes (documents are already hash-shuffled,
    so truncation drops a deterministic, source-balanced tail)."""
    if path.exists() and not force:
        return
    kept: list[np.ndarray] = []
    total = 0
    for ids in encode_documents(tokenizer_path, docs):
        if max_bytes is not None and (total + len(ids)) * 2 > max_bytes:
            break
        kept.append(ids)
        total += len(ids)
    atomic_write_bytes(path, np.concatenate(kept).tobytes())


# --------------------------------------------------------------------------- step 5: text slices


def select_text(docs: list[Document], budget_chars: int) -> str:
    """Whole documents in hash order, each source getting its share of characters in the split."""
    by_source: dict[str, list[Document]] = {}
    for doc in docs:
        by_source.setdefault(doc.source, []).append(doc)
    total = sum(len(d.text) for d in docs)
    chosen: list[Document] = []
    for source_docs in by_source.values():
        share = budget_chars * sum(len(d.text) for d in source_docs) // total
        used = 0
        for doc in source_docs:
            if used + len(doc.text) <= share:
                chosen.append(doc)
                used += len(doc.text)
    chosen.sort(key=lambda d: stable_hash("order:" + d.doc_id))
    return "\n\n".join(d.text for d in chosen) + "\n"


def write_package_texts(train: list[Document], heldout: list[Document], force: bool) -> dict[str, Path]:
    """Small texts shipped in edgeprism/data: held-out text for perplexity, train text for calibration."""
    out_dir = REPO / "edgeprism" / "data"
    targets = {"heldout": (out_dir / "heldout.txt", heldout, HELDOUT_TXT_CHARS),
               "calib": (out_dir / "calib.txt", train, CALIB_TXT_CHARS)}
    for path, docs, budget in targets.values():
        if force or not path.exists():
            atomic_write_text(path, select_text(docs, budget))
    return {name: spec[0] for name, spec in targets.items()}


# --------------------------------------------------------------------------- step 6: stats


def split_stats(docs: list[Document], tokens_path: Path) -> dict[str, object]:
    by_source: dict[str, dict[str, int]] = {}
    for doc in docs:
        entry = by_source.setdefault(doc.source, {"documents": 0, "chars": 0})
        entry["documents"] += 1
        entry["chars"] += len(doc.text)
    tokens = tokens_path.stat().st_size // 2
    return {
        "documents": len(docs),
        "chars": sum(len(d.text) for d in docs),
        "tokens_written": tokens,
        "tokens_file": tokens_path.name,
        "tokens_file_bytes": tokens_path.stat().st_size,
        "by_source": by_source,
    }


def write_stats(data_dir: Path, corpus_dir: Path, splits: dict[str, list[Document]], texts: dict[str, Path]) -> dict[str, object]:
    stats = {
        "sources": {
            "python-docs": "Debian package python3.11-doc, HTML pages -> text, one document per h1/h2 section",
            "gcide": "Debian package dict-gcide (GCIDE 0.48, Webster 1913 + WordNet), one document per entry",
            "manpages": "Debian packages manpages + manpages-dev, rendered by groff, one document per page",
        },
        "groff": subprocess.run(["groff", "--version"], capture_output=True, text=True).stdout.splitlines()[0],
        "package_versions": (corpus_dir / "extracted.ok").read_text().split(),
        "heldout_fraction_of_groups": HELDOUT_PER_MILLE / 1000,
        "vocab_size": VOCAB_SIZE,
        "eos_token": EOS,
        "splits": {name: split_stats(docs, data_dir / f"{name}.u16") for name, docs in splits.items()},
        "package_texts": {name: {"path": str(p.relative_to(REPO)), "chars": len(p.read_text(encoding="utf-8"))}
                          for name, p in texts.items()},
    }
    atomic_write_text(data_dir / "corpus_stats.json", json.dumps(stats, indent=2) + "\n")
    return stats


# --------------------------------------------------------------------------- main


def check_round_trip(tokenizer_path: Path, samples: Iterable[str]) -> None:
    """Byte-level BPE must give decode(encode(s)) == s; fail loudly if the setup broke that."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    for text in samples:
        decoded = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
        if decoded != text:
            raise RuntimeError(f"tokenizer does not round-trip: {text[:80]!r}")


def timed(label: str, fn: Callable[[], object]) -> object:
    start = time.monotonic()
    result = fn()
    print(f"[build_corpus] {label}: {time.monotonic() - start:.1f}s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "data", help="output directory (gitignored)")
    parser.add_argument("--force", action="store_true", help="redo every step")
    args = parser.parse_args()
    data_dir: Path = args.data.resolve()
    corpus_dir = data_dir / "corpus"
    tokenizer_dir = data_dir / "tokenizer"

    root = timed("packages", lambda: fetch_packages(corpus_dir, args.force))
    paths = timed("documents", lambda: write_documents(root, corpus_dir, args.force))
    splits = {name: read_documents(path) for name, path in paths.items()}
    tokenizer_path = timed("tokenizer", lambda: train_tokenizer(splits["train"], tokenizer_dir, args.force))
    check_round_trip(tokenizer_path, (d.text for d in splits["heldout"][:200]))
    timed("train.u16", lambda: write_tokens(tokenizer_path, splits["train"], data_dir / "train.u16", MAX_TRAIN_BYTES, args.force))
    timed("heldout.u16", lambda: write_tokens(tokenizer_path, splits["heldout"], data_dir / "heldout.u16", None, args.force))
    texts = write_package_texts(splits["train"], splits["heldout"], args.force)
    stats = write_stats(data_dir, corpus_dir, splits, texts)
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
