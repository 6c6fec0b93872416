"""Extract stage: one MediaWiki XML dump part -> `<out_dir>/articles.jsonl` of clean article text.

Each line is {"id": str, "title": str, "text": str}, in dump order whatever the number of worker
processes, so the same dump always gives byte-identical output. Only main-namespace articles are
kept; redirects are skipped; articles shorter than `min_chars` after cleaning are dropped.

How the work is split (chosen by measuring on 2 cores, see `gpt2ipu bench extract`): the parent
streams the dump (bz2 decompression + expat page splitting, both in C), packs pages into chunks of
~256 KiB of wikitext and hands them to a pool of `processes` workers, keeping results in dump
order; each worker turns markup into text with wikiextractor's own `Extractor.clean_text`, then
removes the debris it leaves behind (`remove_debris`). Before the conversion, references,
comments and simple links are handled with C-speed regexes: on the real 206-page fragment the text
is the same as wikiextractor alone gives (but for a quote mark beside a removed reference in 2
articles) for about a quarter less of its per-item Python work. wikiextractor's command line also
spends CPU on a separate reducer process and per-page queue traffic.
"""

from __future__ import annotations

import argparse
import bz2
import collections
import contextlib
import gzip
import json
import multiprocessing
import os
import re
import signal
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import IO
from xml.sax.saxutils import escape as xml_escape

from tqdm import tqdm
from wikiextractor.extract import Extractor, define_template, redirectRE

from gpt2ipu.errors import UserError
from gpt2ipu.fsutil import atomic_dir
from gpt2ipu.log import package_logger
from gpt2ipu.provenance import write_provenance

log = package_logger(__name__)

ARTICLES_NAME = "articles.jsonl"
MIN_WIKIEXTRACTOR = (3, 0, 8)
READ_BYTES = 1 << 20
# ~256 KiB of wikitext per task: few enough tasks that queue traffic is negligible, enough of them
# (a real dump part has thousands) that 2..N workers stay evenly loaded.
CHUNK_BYTES = 256 << 10
CHUNK_PAGES = 64
CHUNKS_IN_FLIGHT_PER_PROCESS = 4
MAIN_NAMESPACE = "0"
TEMPLATE_NAMESPACE = "10"


@dataclass
class SiteInfo:
    namespaces: dict[str, str] = field(default_factory=dict)  # key -> name, e.g. "10" -> "Template"

    @property
    def template_prefix(self) -> str:
        return self.namespaces.get(TEMPLATE_NAMESPACE, "Template") + ":"

    def namespace_of(self, title: str) -> str:
        """The namespace key a title's prefix names (old dumps have no <ns> element)."""
        prefix, colon, _ = title.partition(":")
        if colon:
            for key, name in self.namespaces.items():
                if name and name == prefix:
                    return key
        return MAIN_NAMESPACE


@dataclass
class Page:
    id: str
    title: str
    namespace: str
    redirect: bool
    text: str  # wikitext, XML entities already decoded


# ----------------------------------------------------------------------------- reading the dump


@contextlib.contextmanager
def open_dump(path: Path) -> Iterator[tuple[IO[bytes], IO[bytes]]]:
    """(the file as stored, its decompressed stream): the first one's position drives the progress bar."""
    with open(path, "rb") as raw:
        head = raw.read(64)
        magic = head[:3]
        raw.seek(0)
        compressed_name = path.suffix in (".bz2", ".gz")
        if compressed_name and magic != b"BZh" and magic[:2] != b"\x1f\x8b" \
                and head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<"):
            plain = path.name[: -len(path.suffix)]
            plain = plain if plain.endswith(".xml") else plain + ".xml"
            raise UserError(f"{path} is an uncompressed XML file named {path.suffix}: rename it to {plain} "
                            f"(or compress it with {'bzip2' if path.suffix == '.bz2' else 'gzip'})")
        if magic == b"BZh" or path.suffix == ".bz2":
            stream = bz2.BZ2File(raw)
        elif magic[:2] == b"\x1f\x8b" or path.suffix == ".gz":
            stream = gzip.GzipFile(fileobj=raw)
        else:
            stream = raw
        with stream:
            yield raw, stream


def read_dump(path: Path, on_progress: Callable[[int], None] | None = None) -> Iterator[SiteInfo | Page]:
    """Stream the dump: first its SiteInfo, then every <page> in order.

    expat (via ElementTree) rather than wikiextractor's line regexes: it is as fast, checks that the
    file is well-formed XML at all, and copes with any line layout of the export format.
    `on_progress(bytes of the stored file read so far)` is called after each block.
    """
    parser = ET.XMLPullParser(events=("start", "end"))
    state = _ReaderState()
    try:
        with open_dump(path) as (raw, stream):
            while block := stream.read(READ_BYTES):
                parser.feed(block)
                yield from state.handle(parser.read_events(), path)
                if on_progress:
                    on_progress(raw.tell())
            parser.close()
            yield from state.handle(parser.read_events(), path)
    except (EOFError, OSError) as err:  # bz2/gzip: truncated stream or bad data
        raise truncated(path, err) from None
    except ET.ParseError as err:
        if state.root_tag is None:
            raise UserError(
                f"{path} is not MediaWiki XML ({err}); give a MediaWiki XML dump (.xml or .xml.bz2)"
            ) from None
        raise truncated(path, err) from None


def truncated(path: Path, err: Exception) -> UserError:
    return UserError(
        f"{path} is truncated or corrupt ({err}); replace it with a complete copy: rerun the dump stage "
        "(or download it again)"
    )


class _ReaderState:
    """Turns ElementTree events into SiteInfo/Page records, dropping each page once read."""

    def __init__(self) -> None:
        self.root: ET.Element | None = None
        self.root_tag: str | None = None
        self.xmlns = ""
        self.siteinfo = SiteInfo()
        self.siteinfo_sent = False

    def handle(self, events: Iterable[tuple[str, ET.Element]], path: Path) -> Iterator[SiteInfo | Page]:
        for event, elem in events:
            if self.root is None:
                self.start_root(elem, path)
                continue
            if event != "end":
                continue
            name = elem.tag[len(self.xmlns):]
            if name == "siteinfo":
                self.read_siteinfo(elem)
                self.root.remove(elem)
                self.siteinfo_sent = True
                yield self.siteinfo
            elif name == "page":
                if not self.siteinfo_sent:  # an export without <siteinfo>
                    self.siteinfo_sent = True
                    yield self.siteinfo
                yield self.read_page(elem)
                self.root.remove(elem)  # keeps memory flat over a multi-GB dump

    def start_root(self, elem: ET.Element, path: Path) -> None:
        self.root, self.root_tag = elem, elem.tag
        self.xmlns = elem.tag[: elem.tag.index("}") + 1] if elem.tag.startswith("{") else ""
        if elem.tag[len(self.xmlns):] != "mediawiki":
            raise UserError(
                f"{path} is not MediaWiki XML (its root element is <{elem.tag}>, not <mediawiki>); "
                "give a MediaWiki XML dump (.xml or .xml.bz2)"
            )

    def read_siteinfo(self, elem: ET.Element) -> None:
        for ns in elem.iter(f"{self.xmlns}namespace"):
            self.siteinfo.namespaces[ns.get("key", "")] = ns.text or ""

    def read_page(self, elem: ET.Element) -> Page:
        x = self.xmlns
        title = elem.findtext(f"{x}title") or ""
        namespace = elem.findtext(f"{x}ns")
        revisions = elem.findall(f"{x}revision")
        text = (revisions[-1].findtext(f"{x}text") or "") if revisions else ""
        return Page(
            id=(elem.findtext(f"{x}id") or "").strip(),
            title=title,
            namespace=namespace.strip() if namespace is not None else self.siteinfo.namespace_of(title),
            redirect=elem.find(f"{x}redirect") is not None or bool(redirectRE.match(text[:1000].lstrip())),
            text=text,
        )


# ----------------------------------------------------------------------------- cleaning the text

# Tags that survive wikiextractor now and then (unpaired, or nested in something it dropped).
# A fixed list, not "anything in angle brackets", so that text like "x<y and z>w" is kept.
_TAG_NAMES = (
    "a|abbr|b|bdi|big|blockquote|br|caption|categorytree|ce|center|chem|cite|code|data|dd|del|div|dl|dt|"
    "em|font|gallery|graph|hiero|hr|i|imagemap|includeonly|indicator|inputbox|ins|kbd|li|mapframe|maplink|"
    "mark|math|noinclude|nowiki|ol|onlyinclude|p|poem|pre|q|rb|ref|references|rp|rt|ruby|s|score|section|"
    "small|source|span|strike|strong|sub|sup|syntaxhighlight|table|td|templatestyles|th|time|timeline|"
    "tr|tt|u|ul|var|wbr"
)
# Unrolled (no ".*?"), so that an unclosed <ref> costs a scan to the next ref tag, not to the end.
REF_ELEMENT = re.compile(r"<ref\b[^<>]*(?<!/)>[^<]*(?:<(?!/?ref\b)[^<]*)*</ref\s*>", re.I)
REF_OR_COMMENT = re.compile(rf"{REF_ELEMENT.pattern}|<ref\b[^<>]*/>|<!--.*?-->", re.I | re.S)
# Links with no namespace, at most one pipe and nothing nested, as wikiextractor's makeInternalLink
# renders them without keepLinks: the (trimmed) label, else the target as written.
PIPED_LINK = re.compile(r"\[\[[^\[\]|:]*\|\s*([^\[\]|]*?)\s*\]\]")
PLAIN_LINK = re.compile(r"\[\[([^\[\]|:]*)\]\]")
HTML_TAG = re.compile(rf"</?(?:{_TAG_NAMES})\b[^<>]*>", re.I)
INNER_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
INNER_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)*([^\[\]|]*)\]\]")
MARKUP_TOKENS = ("{{", "}}", "[[", "]]", "{|", "|}")
# Table rows/headers that slipped through: "| cell", "{| class=..", "! Year !! Title" (not "!Kung").
TABLE_LINE = re.compile(r"^(?:\{\||\||!(?=\s|[^\n]*(?:!!|\|)))[^\n]*", re.M)
TABLE_LINE_STARTS = ("\n|", "\n!", "\n{|")
# Removed templates (pronunciations, transliterations, conversions) leave their separators behind:
# "Alaska () is", "Averruncus (; from Latin", "Asphalt (, occasionally)", "Andorra (;,),",
# "Greek:, ", "Rosenbaum, ;". Few passes, gated by cheap `in` tests, and patterns that start with a
# literal where possible: one pass over the text costs a few percent of wikiextractor's conversion.
SEPARATORS_AFTER_OPEN = re.compile(r"\(\s*[,;:][\s,;:]*")
SEPARATORS_BEFORE_CLOSE_OR_RUN = re.compile(r"[,;:](?:[\s,;:]*\)|(?:\s*[,;])+)")
EMPTY_PARENS = re.compile(r"\(\s*\)")
EMPTY_QUOTES = re.compile(r'""')
SPACES = re.compile(r"  +")
SPACE_BEFORE_PUNCT = re.compile(r" (?=[,.;:!?)\]])")
HEADING_COLONS = re.compile(r":(?::+\.?|\.)$", re.M)  # headings "Section::" / "Notes:." -> "Section."
HAS_WORD = re.compile(r"[^\W_]")


def keep_close_or_first(match: re.Match) -> str:
    """"x, ;)" -> "x)" and "x, ; y" -> "x, y": the separators before a ")" go, a run keeps its first."""
    found = match.group()
    return ")" if found.endswith(")") else found[0]


def drop_empty_quotes(match: re.Match) -> str:
    """'and "" (There' -> 'and (There', but 'said ""Elegant"' stays: only a quote pair standing alone."""
    text, start = match.string, match.start()
    before = text[start - 1] if start else " "
    after = text[start + 2] if start + 2 < len(text) else " "
    if (before.isspace() or before == "(") and (after.isspace() or after in "),.;:"):
        return ""
    return match.group()


def strip_inner(pattern: re.Pattern, replacement: str, text: str) -> str:
    """Apply `pattern` until nothing matches, so nested {{..{{..}}..}} goes from the inside out."""
    while True:
        text, count = pattern.subn(replacement, text)
        if not count:
            return text


def remove_debris(text: str) -> str:
    """Remove what wikiextractor leaves behind: stray markup, tags, empty brackets, blank lines."""
    if "<" in text:
        text = REF_ELEMENT.sub("", text)
        text = HTML_TAG.sub("", text)
    if "{{" in text:
        text = strip_inner(INNER_TEMPLATE, "", text)
    if "[[" in text:
        text = strip_inner(INNER_LINK, r"\1", text)
    if text.startswith(("|", "!", "{|")) or any(start in text for start in TABLE_LINE_STARTS):
        text = TABLE_LINE.sub("", text)
    if "{" in text or "}" in text or "[" in text or "]" in text:
        for token in MARKUP_TOKENS:
            text = text.replace(token, "")
    if '""' in text:
        text = EMPTY_QUOTES.sub(drop_empty_quotes, text)
    if "(" in text:
        text = SEPARATORS_AFTER_OPEN.sub("(", text)
    text = SEPARATORS_BEFORE_CLOSE_OR_RUN.sub(keep_close_or_first, text)
    if "(" in text:
        text = EMPTY_PARENS.sub("", text)
    # wikiextractor leaves some too ("early form , which"), so this pass is not only for ours.
    text = SPACES.sub(" ", text)
    text = SPACE_BEFORE_PUNCT.sub("", text)
    text = HEADING_COLONS.sub(".", text)
    lines = []
    for line in text.split("\n"):
        line = line.strip()
        if line and HAS_WORD.search(line):
            lines.append(line)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- worker side

_worker: dict = {}


def _init_worker(settings: dict) -> None:
    # Ctrl-C reaches the whole process group. Only the parent may act on it: a worker killed by
    # KeyboardInterrupt while holding the pool's task-queue lock makes Pool.terminate() hang.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker.update(settings)


def _extract_chunk(chunk: list[tuple[str, str, str]]) -> list[tuple[str | None, str]]:
    """[(id, title, wikitext)] -> [(skip_reason, "")] or [(None, JSON line)], in the same order.

    The JSON line is made here, so that the parent (the one serial step) only writes it.
    """
    return [_extract_page(*page) for page in chunk]


def _extract_page(page_id: str, title: str, wikitext: str) -> tuple[str | None, str]:
    try:
        extractor = Extractor(
            page_id, "", "", title, [],
            templates=_worker["templates"], redirects=_worker["redirects"],
            templatePrefix=_worker["template_prefix"], knownNamespaces=_worker["known_namespaces"],
        )
        # wikiextractor drops references and comments in the end anyway; dropping them first
        # spares it a quarter of its work (citation templates are most of an article's markup).
        wikitext = REF_OR_COMMENT.sub("", wikitext)
        if not _worker["expand_templates"] and "[[" in wikitext:
            # Its link conversion is a Python loop per link; simple links are done here at C speed,
            # with the same result (output checked identical on the real fragment). Not with
            # expansion on, where a link may be a template argument.
            wikitext = PLAIN_LINK.sub(r"\1", PIPED_LINK.sub(r"\1", wikitext))
        # It expects the text as it stands in the XML file, entities still encoded.
        wikitext = xml_escape(wikitext)
        paragraphs = extractor.clean_text(wikitext, expand_templates=_worker["expand_templates"], html_safe=False)
    except Exception as err:  # one odd page must not stop a multi-hour extraction
        return "extractor_error", f"page {page_id} {title!r}: {type(err).__name__}: {err}"
    text = remove_debris("\n".join(paragraphs))
    if not text:
        return "empty", ""
    if len(text) < _worker["min_chars"]:
        return "too_short", ""
    return None, json.dumps({"id": page_id, "title": title, "text": text}, ensure_ascii=False) + "\n"


# ----------------------------------------------------------------------------- parent side


def collect_templates(dump_path: Path, siteinfo: SiteInfo) -> tuple[dict, dict]:
    """{title: body} of the dump's Template: pages, and {title: target} of its template redirects.

    A plain dict through wikiextractor's own `define_template`: one dump part's templates are small
    enough that the shared-memory blob its command line builds for a whole wiki is not needed.
    """
    templates: dict[str, str] = {}
    redirects: dict[str, str] = {}
    prefix = siteinfo.template_prefix
    for item in read_dump(dump_path):
        if isinstance(item, Page) and (item.namespace == TEMPLATE_NAMESPACE or item.title.startswith(prefix)):
            define_template(item.title, [xml_escape(item.text)], templates, redirects)
    return templates, redirects


def chunk_pages(pages: Iterable[Page]) -> Iterator[list[tuple[str, str, str]]]:
    chunk, size = [], 0
    for page in pages:
        chunk.append((page.id, page.title, page.text))
        size += len(page.text)
        if size >= CHUNK_BYTES or len(chunk) >= CHUNK_PAGES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def ordered_map(pool, func, tasks: Iterable, in_flight: int) -> Iterator:
    """`pool.imap` with a bound on queued tasks: imap reads its input as fast as it can, which
    for a multi-GB dump would hold the whole decompressed part in memory."""
    pending: collections.deque = collections.deque()
    for task in tasks:
        pending.append(pool.apply_async(func, (task,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class Tally:
    def __init__(self) -> None:
        self.pages = 0
        self.articles = 0
        self.skipped: collections.Counter = collections.Counter()


class Progress:
    """A tqdm bar over bytes of the stored dump (which gives an ETA), with pages/s in its postfix.

    The bar is opened only after the worker pool has forked: tqdm starts a monitor thread, and
    forking a process that has threads is unsafe.
    """

    def __init__(self, dump_path: Path, tally: Tally) -> None:
        self.dump_path, self.tally = dump_path, tally
        self.position = 0
        self._bar: tqdm | None = None

    def bar(self) -> tqdm:
        self._bar = tqdm(desc=f"extract {self.dump_path.name}", total=self.dump_path.stat().st_size, unit="B",
                         unit_scale=True, unit_divisor=1024, file=sys.stderr, mininterval=0.5)
        self._bar.update(self.position)
        return self._bar

    def update(self, position: int) -> None:
        self.position = position
        if self._bar is not None:
            rate = self.tally.pages / (self._bar.format_dict["elapsed"] or 1e-9)
            self._bar.set_postfix_str(f"{self.tally.pages} pages, {rate:.0f} pages/s", refresh=False)
            self._bar.update(position - self._bar.n)


def main_namespace_pages(items: Iterator[SiteInfo | Page], tally: Tally) -> Iterator[Page]:
    for item in items:
        if not isinstance(item, Page):
            continue
        tally.pages += 1
        if item.namespace != MAIN_NAMESPACE:
            tally.skipped["not_main_namespace"] += 1
        elif item.redirect:
            tally.skipped["redirect"] += 1
        else:
            yield item


def pool_context() -> multiprocessing.context.BaseContext:
    # fork: workers start in milliseconds with wikiextractor (and the templates) already loaded.
    return multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")


def check_arguments(dump_path: Path, processes: int, min_chars: int) -> None:
    if not dump_path.is_file():
        raise UserError(f"dump file {dump_path} does not exist; run the dump stage first or give --dump")
    if processes < 1:
        raise UserError(f"processes must be at least 1 (got {processes})")
    if min_chars < 0:
        raise UserError(f"min_chars must be 0 or more (got {min_chars})")
    found = tuple(int(p) for p in re.findall(r"\d+", version("wikiextractor"))[:3])
    if found < MIN_WIKIEXTRACTOR:
        raise UserError(f"wikiextractor {version('wikiextractor')} is too old; pip install 'wikiextractor>=3.0.8'")


def extract(
    dump_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    processes: int,
    expand_templates: bool = False,
    min_chars: int = 200,
) -> dict:
    """Extract one dump part into `<out_dir>/articles.jsonl` + provenance.json; return the figures.

    expand_templates: expand templates from the dump's own Template: pages (two passes over the
    file); off, they are dropped, as wikiextractor's `--no-templates`. When on, time-dependent magic
    words such as {{CURRENTYEAR}} take today's date (wikiextractor reads the clock), so expanded
    output is byte-identical across days only for dumps that do not use them.
    """
    dump_path, out_dir = Path(dump_path), Path(out_dir)
    check_arguments(dump_path, processes, min_chars)
    start = time.perf_counter()
    tally = Tally()
    progress = Progress(dump_path, tally)
    items = read_dump(dump_path, progress.update)
    siteinfo = next(items, None)
    if not isinstance(siteinfo, SiteInfo):
        raise UserError(f"{dump_path} holds no <page>: it is not a MediaWiki XML dump part")
    templates, redirects = collect_templates(dump_path, siteinfo) if expand_templates else ({}, {})
    settings = {
        "templates": templates,
        "redirects": redirects,
        "template_prefix": siteinfo.template_prefix,
        "known_namespaces": {"Template", *siteinfo.namespaces.values()} - {""},
        "expand_templates": expand_templates,
        "min_chars": min_chars,
    }
    with atomic_dir(out_dir) as tmp:
        articles_path = tmp / ARTICLES_NAME
        with (
            pool_context().Pool(processes, initializer=_init_worker, initargs=(settings,)) as pool,
            progress.bar(),
            open(articles_path, "w", encoding="utf-8", newline="\n") as out,
        ):
            pages = main_namespace_pages(items, tally)
            in_flight = CHUNKS_IN_FLIGHT_PER_PROCESS * processes
            for results in ordered_map(pool, _extract_chunk, chunk_pages(pages), in_flight):
                write_articles(results, out, tally)
        if tally.articles == 0:
            raise UserError(
                f"{dump_path}: no article survived extraction ({tally.pages} pages seen; skipped: "
                f"{dict(tally.skipped) or 'none'}); min_chars={min_chars} may be too high, or the file "
                "holds no main-namespace articles"
            )
        figures = {
            "pages": tally.pages,
            "articles": tally.articles,
            "skipped": dict(sorted(tally.skipped.items())),
            "input_bytes": dump_path.stat().st_size,
            "output_bytes": articles_path.stat().st_size,
            "seconds": round(time.perf_counter() - start, 3),
        }
        params = {
            "processes": processes,
            "expand_templates": expand_templates,
            "min_chars": min_chars,
            "wikiextractor_version": version("wikiextractor"),
        }
        write_provenance(tmp, "extract", params, [dump_path], figures)
    return figures


def write_articles(results: list[tuple[str | None, str]], out: IO[str], tally: Tally) -> None:
    for reason, payload in results:
        if reason is None:
            out.write(payload)
            tally.articles += 1
        else:
            tally.skipped[reason] += 1
            if reason == "extractor_error":
                tqdm.write(f"extract: skipped {payload}", file=sys.stderr)


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dump", required=True, type=Path, help="MediaWiki XML dump part (.xml or .xml.bz2)")
    parser.add_argument("--out-dir", required=True, type=Path, help="output folder (articles.jsonl, provenance.json)")
    parser.add_argument("--processes", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="worker processes (default: CPU count - 1)")
    parser.add_argument("--expand-templates", action="store_true",
                        help="expand templates with the dump's own Template: pages (off: templates are dropped)")
    parser.add_argument("--min-chars", type=int, default=200, help="drop articles shorter than this after cleaning")


def run(args: argparse.Namespace) -> int:
    figures = extract(args.dump, args.out_dir, processes=args.processes,
                          expand_templates=args.expand_templates, min_chars=args.min_chars)
    log.info(f"extract: {figures['articles']} articles from {figures['pages']} pages in {figures['seconds']} s "
             f"-> {args.out_dir / ARTICLES_NAME}")
    return 0
