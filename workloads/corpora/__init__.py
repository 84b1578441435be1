"""Real text shipped with polytrain, so a comparison on real data needs no download
and reads the same bytes on every machine (each corpus's hash is checked on load).

``python-stdlib``: the 168 top-level modules of CPython 3.11.7's standard library
(``Lib/*.py``, sorted by name), one document each, 4.7 MB of source code; PSF
licence in ``python-stdlib.LICENSE.txt``. Made with::

    cd "$(python3.11 -c 'import os, sysconfig; print(sysconfig.get_path("stdlib"))')"
    python3.11 -c 'import glob, lzma, sys; sys.stdout.buffer.write(lzma.compress(
        b"\\x1e".join(open(f, "rb").read() for f in sorted(glob.glob("*.py"))), preset=9 | lzma.PRESET_EXTREME))' \
        > python-stdlib.xz
"""
from __future__ import annotations

import hashlib
import lzma
from dataclasses import dataclass
from importlib import resources

SEPARATOR = b"\x1e"  # ASCII record separator: between documents, in no document


@dataclass(frozen=True, kw_only=True)
class Corpus:
    file: str
    sha256: str  # of the decompressed bytes: what a model reads
    description: str


CORPORA = {
    "python-stdlib": Corpus(
        file="python-stdlib.xz",
        sha256="d9089d31f07c1a9b5e8b1682d97e17ab060a78094733ba654ac3a6e2254c9b5f",
        description="CPython 3.11.7's top-level standard library modules, 4.7 MB of source code"),
}


def load_corpus(name: str) -> list[bytes]:
    """The corpus's documents, after checking its bytes are the ones every machine reads."""
    corpus = CORPORA[name]
    raw = lzma.decompress(resources.files(__package__).joinpath(corpus.file).read_bytes())
    digest = hashlib.sha256(raw).hexdigest()
    if digest != corpus.sha256:
        raise ValueError(f"corpus={name!r}: sha256 {digest[:12]}... of the shipped file, expected "
                         f"{corpus.sha256[:12]}... (the package's copy is damaged: reinstall polytrain)")
    return raw.split(SEPARATOR)
