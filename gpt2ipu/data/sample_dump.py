"""The embedded sample: a generated, deterministic MediaWiki XML export (bz2), so the whole
pipeline runs offline.

The output follows the real export schema (export-0.10, as in the enwiki dumps): a `<siteinfo>`
with the standard namespaces, then `<page>` elements with title, ns, id, `<redirect>` for
redirects, and one revision (id, timestamp, contributor, model, format, text, sha1).

The page texts use the markup that the extract stage must cope with in the real dump:
infoboxes and other templates, internal/external links, `<ref>` with named reuse and
{{cite ...}}, wikitables, lists, headings, files, categories, redirects, disambiguation pages,
non-ASCII text (accents, Greek, CJK, em dashes), empty and very short pages, and pages in the
Template:, Category: and File: namespaces.

Article prose comes from a small seeded grammar: a few hundred shared words plus a vocabulary
per topic (rivers, towns, scientists...), so a language model trained on it can learn real
structure and its loss goes down. Everything is derived from (seed, page index), never from
the clock or the machine, so the same arguments give a byte-identical file, and a page is the
same whichever part it falls into.
"""

from __future__ import annotations

import bz2
import datetime as dt
import hashlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2ipu.data.sample_vocab import (
    ACCENTED_VOWELS,
    ADVERBS,
    CODAS,
    CONNECTORS,
    COPULA_ADJ,
    FIRST_NAMES,
    GENERIC_NOUNS,
    GREEK_LETTERS,
    ONSETS,
    ORDINALS,
    PREPS,
    PUBLISHERS,
    TOPICS,
    VOWELS,
    Topic,
)
from gpt2ipu.errors import UserError
from gpt2ipu.fsutil import atomic_dir
from gpt2ipu.provenance import write_provenance

PAGES_NAME = "pages.xml.bz2"
BZ2_LEVEL = 9

KIND_BLOCK = (["article"] * 29 + ["stub"] + ["redirect"] * 3 + ["disambiguation", "empty",
              "template", "category", "category", "file", "file"])


@dataclass
class PagePlan:
    index: int
    kind: str
    title: str = ""
    ns: int = 0
    topic: Topic | None = None
    name: str = ""            # the name the title is built on (shared by disambiguated pages)
    last: str = ""            # surname, for people
    region: str = ""
    target: str = ""          # redirect target


def _syllable(rng: random.Random, accented: bool) -> str:
    vowel = rng.choice(ACCENTED_VOWELS) if accented else rng.choice(VOWELS)
    coda = rng.choice(CODAS) if rng.random() < 0.4 else ""
    return rng.choice(ONSETS) + vowel + coda


def _make_name(rng: random.Random, syllables: int | None = None) -> str:
    count = syllables or rng.choice((2, 2, 2, 3))
    accent_at = rng.randrange(count) if rng.random() < 0.15 else -1
    return "".join(_syllable(rng, i == accent_at) for i in range(count)).capitalize()


class World:
    """Names, regions and the page plan of one generated dump."""

    def __init__(self, pages: int, seed: int):
        rng = random.Random(f"gpt2ipu-sample:{seed}:world")
        self.regions = _unique(lambda: _make_name(rng, 3), 24)
        articles_estimate = max(8, pages * 3 // 4)
        self.names = _unique(lambda: _make_name(rng), max(6, articles_estimate // 3))
        self.surnames = _unique(lambda: _make_name(rng), 60)
        self.plans = self._plan(pages, rng)
        self.articles = [p for p in self.plans if p.kind in ("article", "stub")]
        self.by_name: dict[str, list[PagePlan]] = {}
        for article in self.articles:
            self.by_name.setdefault(article.name, []).append(article)

    def _plan(self, pages: int, rng: random.Random) -> list[PagePlan]:
        kinds: list[str] = []
        while len(kinds) < pages:
            block = list(KIND_BLOCK)
            rng.shuffle(block)
            kinds.extend(block)
        plans = [PagePlan(index=i, kind=kind) for i, kind in enumerate(kinds[:pages])]
        taken: set[str] = set()
        for plan in plans:
            if plan.kind in ("article", "stub", "empty"):
                self._plan_article(plan, rng, taken)
        articles = [p for p in plans if p.kind in ("article", "stub")]
        for plan in plans:
            if plan.kind == "redirect":
                self._plan_redirect(plan, rng, taken, articles)
            elif plan.kind == "disambiguation":
                plan.name = rng.choice(self.names)
                plan.title = _fresh(plan.name, taken, suffix=" (disambiguation)")
            elif plan.kind == "template":
                plan.ns, plan.topic, plan.region = 10, rng.choice(TOPICS), rng.choice(self.regions)
                plan.title = next((t for t in (f"Template:Infobox {plan.topic.key}",
                                               f"Template:{plan.region}-{plan.topic.key}-stub")
                                   if t not in taken), None) or _fresh(f"Template:{plan.region} topics", taken)
                taken.add(plan.title)
            elif plan.kind == "category":
                topic, region = rng.choice(TOPICS), rng.choice(self.regions)
                plan.ns, plan.topic, plan.region = 14, topic, region
                plan.title = _fresh("Category:" + topic.category.format(region=region), taken)
            elif plan.kind == "file":
                plan.ns, plan.topic = 6, rng.choice(TOPICS)
                plan.name = rng.choice(self.names)
                plan.title = _fresh(f"File:{plan.name} {plan.topic.key} {rng.randint(1, 9)}.jpg", taken)
        return plans

    def _plan_article(self, plan: PagePlan, rng: random.Random, taken: set[str]) -> None:
        plan.topic = rng.choice(TOPICS)
        plan.region = rng.choice(self.regions)
        plan.name = rng.choice(self.names)
        if plan.topic.key == "scientist":
            plan.last = plan.name
            plan.title = f"{rng.choice(FIRST_NAMES)} {plan.name}"
        else:
            plan.title = plan.topic.title.format(name=plan.name)
        if plan.title in taken and plan.title.endswith(")"):   # "X (album)" -> "X (Region album)"
            plan.title = plan.title.replace(" (", f" ({plan.region} ", 1)
        plan.title = _fresh(plan.title, taken, suffix=f" ({plan.region})")

    def _plan_redirect(self, plan: PagePlan, rng: random.Random, taken: set[str],
                       articles: list[PagePlan]) -> None:
        if not articles:   # a tiny dump drew no article yet: nothing to redirect to
            plan.kind = "stub"
            self._plan_article(plan, rng, taken)
            return
        target = rng.choice(articles)
        plan.target, plan.topic = target.title, target.topic
        variants = [target.title.lower().capitalize(), f"{target.name} ({target.topic.noun})",
                    f"{target.title} ({target.region})"]
        if target.last:
            variants.insert(0, f"{target.last}, {target.title.split()[0]}")
        plan.title = next((v for v in variants if v not in taken), None) or _fresh(variants[-1], taken)
        taken.add(plan.title)


def _unique(make, count: int) -> list[str]:
    seen: dict[str, None] = {}
    while len(seen) < count:
        seen.setdefault(make(), None)
    return list(seen)


def _fresh(title: str, taken: set[str], suffix: str = " (2)") -> str:
    candidate, n = title, 1
    while candidate in taken:
        n += 1
        candidate = f"{title}{suffix}" if n == 2 else f"{title}{suffix} {n}"
    taken.add(candidate)
    return candidate


# ----------------------------------------------------------------------------------------------
# Prose: a seeded grammar. Sentences are built from the shared words and the page's topic
# vocabulary; a fraction of noun phrases become links, and some sentences get references.

def _plural(noun: str) -> str:
    if noun.endswith(("s", "sh", "ch", "x")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class Writer:
    """Writes one page's wikitext; `words` counts the prose words written so far."""

    def __init__(self, world: World, plan: PagePlan, rng: random.Random):
        self.world, self.plan, self.rng = world, plan, rng
        self.topic = plan.topic or TOPICS[0]
        self.words = 0
        self.ref_names: list[str] = []

    # -- small pieces ---------------------------------------------------------------------
    def link(self) -> str:
        rng = self.rng
        if not self.world.articles or rng.random() < 0.1:
            return f"[[{rng.choice(self.world.regions)} {rng.choice(self.topic.nouns)}]]"   # a red link
        target = rng.choice(self.world.articles)
        if rng.random() < 0.3 and target.name != target.title:
            return f"[[{target.title}|{target.last or target.name}]]"
        return f"[[{target.title}]]"

    def person(self) -> str:
        return f"{self.rng.choice(FIRST_NAMES)} {self.rng.choice(self.world.surnames)}"

    def year(self) -> int:
        return self.rng.randint(1650, 2015)

    def subject(self) -> str:
        rng, topic = self.rng, self.topic
        roll = rng.random()
        if roll < 0.3:
            return self.short_name()
        if roll < 0.5:
            return f"The {topic.noun.split()[-1]}"
        if roll < 0.65:
            return "It"
        if roll < 0.85:
            return f"The {rng.choice(topic.adjectives)} {rng.choice(topic.nouns)}"
        return f"Its {rng.choice(topic.nouns)}"

    def short_name(self) -> str:
        text = self.topic.short.format(name=self.plan.name, last=self.plan.last or self.plan.name)
        return text[0].upper() + text[1:]

    def object(self) -> str:
        rng, topic = self.rng, self.topic
        roll = rng.random()
        if roll < 0.15:
            return self.link()
        if roll < 0.45:
            return f"the {rng.choice(topic.adjectives)} {rng.choice(topic.nouns)}"
        if roll < 0.65:
            return f"several {_plural(rng.choice(topic.nouns))}"
        if roll < 0.8:
            return f"the {rng.choice(topic.nouns)} of the {rng.choice(GENERIC_NOUNS)}"
        noun = rng.choice(topic.nouns)
        return f"{_article(noun)} {noun}"

    def phrase(self) -> str:
        rng = self.rng
        roll = rng.random()
        if roll < 0.25:
            return f" in {self.year()}"
        if roll < 0.45:
            return f" {rng.choice(PREPS)} [[{rng.choice(self.world.regions)}]]"
        if roll < 0.55:
            return f" during the {rng.choice(ORDINALS)} century"
        if roll < 0.65:
            return f" with the help of {self.person()}"
        return ""

    def sentence(self) -> str:
        rng, topic = self.rng, self.topic
        roll = rng.random()
        verb = rng.choice(topic.verbs)
        if roll < 0.35:
            text = f"{self.subject()} {verb} {self.object()}{self.phrase()}."
        elif roll < 0.55:
            subject = self.subject()
            if subject.startswith(("The ", "It")):   # lower-case only common words, not names
                subject = subject[0].lower() + subject[1:]
            text = f"{rng.choice(CONNECTORS)} {subject} {verb} {self.object()}{self.phrase()}."
        elif roll < 0.7:
            text = (f"{self.subject()} was {rng.choice(ADVERBS)} {rng.choice(COPULA_ADJ)} for its "
                    f"{rng.choice(topic.nouns)}{self.phrase()}.")
        elif roll < 0.82:
            adjective = rng.choice(topic.adjectives)
            aside = f"\u2014 {_article(adjective)} {adjective} {rng.choice(topic.nouns)}"
            phrase = self.phrase()
            aside = f"{aside} \u2014{phrase}" if phrase else aside
            text = f"{self.subject()} {verb} {self.object()} {aside}."
        elif roll < 0.94:
            text = (f"{self.subject()} {verb} {self.object()} and {rng.choice(topic.verbs)} "
                    f"{self.object()}.")
        else:
            text = f"In {self.year()}, {self.person()} {verb} {self.object()}."
        self.words += text.count(" ") + 1
        return text + self.maybe_ref()

    def maybe_ref(self) -> str:
        rng = self.rng
        roll = rng.random()
        if roll < 0.08 and self.ref_names:
            return f"<ref name={rng.choice(self.ref_names)}/>"
        if roll < 0.14:
            name = f"{rng.choice(self.world.surnames).lower()}{self.year()}"
            self.ref_names.append(name)
            return f'<ref name="{name}">{self.cite_web()}</ref>'
        if roll < 0.2:
            return f"<ref>{self.cite_book()}</ref>"
        return ""

    def cite_web(self) -> str:
        rng = self.rng
        slug = f"{self.plan.name.lower()}-{rng.choice(self.topic.nouns)}-{rng.randint(1, 999)}"
        return (f"{{{{cite web |url=http://example.org/{slug} |title={self.plan.name} "
                f"{rng.choice(self.topic.nouns)} |publisher={rng.choice(PUBLISHERS)} "
                f"|access-date={rng.randint(2005, 2016)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}}}}}")

    def cite_book(self) -> str:
        rng = self.rng
        return (f"{{{{cite book |last={rng.choice(self.world.surnames)} |first={rng.choice(FIRST_NAMES)} "
                f"|title=A history of {_plural(rng.choice(self.topic.nouns))} |year={self.year()} "
                f"|page={rng.randint(1, 400)}}}}}")

    def paragraph(self) -> str:
        return " ".join(self.sentence() for _ in range(self.rng.randint(3, 7)))

    # -- blocks ---------------------------------------------------------------------------
    def infobox(self) -> str:
        rng, plan = self.rng, self.plan
        values = {
            "name": lambda: self.display_title(), "region": lambda: f"[[{plan.region}]]",
            "number": lambda: f"{rng.randint(2, 9000):,}", "year": lambda: str(self.year()),
            "person": lambda: f"[[{self.person()}]]", "place": self.link,
            "word": lambda: rng.choice(self.topic.nouns),
            "birth": lambda: f"{{{{birth date|{self.year()}|{rng.randint(1, 12)}|{rng.randint(1, 28)}}}}}",
        }
        lines = [f"{{{{Infobox {self.topic.key}"]
        lines += [f"| {field} = {values[kind]()}" for field, kind in self.topic.infobox]
        return "\n".join(lines) + "\n}}"

    def display_title(self) -> str:
        return self.plan.title.split(" (")[0]

    def lead(self) -> str:
        rng, plan, topic = self.rng, self.plan, self.topic
        greek = plan.name.lower().translate(GREEK_LETTERS)
        # Half as a template (which extraction drops), half as plain text (which it keeps).
        gloss = rng.choice((f" ({{{{lang-el|{topic.greek} {greek}}}}}; Japanese: {topic.cjk})",
                            f" (Greek: {topic.greek} {greek}; Japanese: {topic.cjk})", "", ""))
        adjective = rng.choice(topic.adjectives)
        text = (f"'''{self.display_title()}'''{gloss} is {_article(adjective)} {adjective} {topic.noun} in "
                f"[[{plan.region}]].{self.maybe_ref()} ")
        self.words += 8
        return text + self.paragraph()

    def bullet_list(self) -> str:
        ordered = self.rng.random() < 0.35
        marker = "#" if ordered else "*"
        items = []
        for _ in range(self.rng.randint(3, 6)):
            item = self.sentence() if ordered else f"{self.link()}, {self.object()}{self.phrase()}"
            items.append(f"{marker} {item}")
        self.words += 3 * len(items)
        return "\n".join(items)

    def table(self) -> str:
        rng = self.rng
        noun = rng.choice(self.topic.nouns)
        rows = ['{| class="wikitable sortable"', f"|+ {_plural(noun).capitalize()} by year",
                f"! Year !! {noun.capitalize()} !! Place"]
        for year in sorted(rng.sample(range(1800, 2015), rng.randint(2, 6))):
            rows += ["|-", f"| {year} || {rng.randint(1, 5000):,} || {self.link()}"]
        rows.append("|}")
        return "\n".join(rows)

    def figure(self) -> str:
        return (f"[[File:{self.plan.name} {self.topic.key} {self.rng.randint(1, 9)}.jpg|thumb|"
                f"{self.short_name()} {self.rng.choice(PREPS)} {self.link()}]]")

    def section(self, heading: str) -> str:
        rng = self.rng
        blocks = [f"== {heading} =="]
        if rng.random() < 0.15:
            blocks.append(f"{{{{Main|{self.link()[2:-2].split('|')[0]}}}}}")
        for _ in range(rng.randint(1, 3)):
            roll = rng.random()
            if roll < 0.12:
                blocks.append(self.bullet_list())
            elif roll < 0.2:
                blocks.append(self.table())
            elif roll < 0.25:
                blocks.append(self.figure())
            blocks.append(self.paragraph())
        if rng.random() < 0.2:
            blocks.append(f"=== {rng.choice(self.topic.sections)} and {rng.choice(GENERIC_NOUNS)} ===")
            blocks.append(self.paragraph())
        return "\n\n".join(blocks)


# ----------------------------------------------------------------------------------------------
# Page texts, one function per kind

def _target_words(rng: random.Random) -> int:
    # lognormal: mean about 400 words, a long tail, clipped to 100..1500
    return int(min(1500, max(100, rng.lognormvariate(math.log(400) - 0.18, 0.6))))


def article_text(writer: Writer) -> str:
    rng, plan, topic = writer.rng, writer.plan, writer.topic
    parts = [f"{{{{Short description|{topic.noun.capitalize()} in {plan.region}}}}}"]
    if rng.random() < 0.3:
        parts.append(f"{{{{Use dmy dates|date={rng.choice(('March', 'July', 'October'))} {rng.randint(2010, 2016)}}}}}")
    parts += [writer.infobox(), writer.lead()]
    target = _target_words(rng)
    headings = list(topic.sections)
    rng.shuffle(headings)
    while writer.words < target:
        extra = f"{rng.choice(topic.nouns).capitalize()} {rng.choice(('records', 'notes', 'today'))}"
        heading = headings.pop() if headings else extra
        parts.append(writer.section(heading))
    if rng.random() < 0.5:
        parts.append("== See also ==\n" + "\n".join(f"* {writer.link()}" for _ in range(rng.randint(2, 4))))
    parts.append("== References ==\n{{Reflist}}")
    parts.append(f"== External links ==\n* [http://example.org/{plan.name.lower()} Official site of "
                 f"{plan.name}]\n* {{{{Commons category|{plan.title}}}}}")
    parts.append(f"[[Category:{topic.category.format(region=plan.region)}]]\n"
                 f"[[Category:{_plural(topic.noun.split()[-1]).capitalize()}]]")
    return "\n\n".join(parts) + "\n"


def stub_text(writer: Writer) -> str:
    plan, topic = writer.plan, writer.topic
    return (f"'''{plan.title}''' is a {topic.noun} in [[{plan.region}]].{writer.maybe_ref()}\n\n"
            f"{{{{{plan.region}-{topic.key}-stub}}}}\n\n[[Category:{topic.category.format(region=plan.region)}]]")


def redirect_text(writer: Writer) -> str:
    return f"#REDIRECT [[{writer.plan.target}]]\n\n{{{{Redirect category shell|{{{{R from alternative name}}}}}}}}"


def disambiguation_text(writer: Writer) -> str:
    name = writer.plan.name
    lines = [f"'''{name}''' may refer to:", ""]
    for article in writer.world.by_name.get(name, []):
        lines.append(f"* [[{article.title}]], {_article(article.topic.noun)} {article.topic.noun} "
                     f"in [[{article.region}]]")
    lines.append(f"* {name}, a {writer.rng.choice(('surname', 'character in a novel', 'given name'))}")
    lines += ["", "== See also ==", f"* {writer.link()}", "", "{{disambiguation}}"]
    return "\n".join(lines)


def template_text(writer: Writer) -> str:
    if writer.plan.title.endswith("-stub"):
        return (f"{{{{Asbox\n| image = Globe.svg\n| subject = {_article(writer.topic.noun)} {writer.topic.noun}"
                f"\n| qualifier = in [[{writer.plan.region}]]\n| category = {writer.plan.region} stubs\n| name = "
                f"{writer.plan.title}\n}}}}")
    lines = ["{{Infobox", "| above = {{{name|{{PAGENAME}}}}}"]
    for i, (field, _kind) in enumerate(writer.topic.infobox[1:], start=1):
        lines += [f"| label{i} = {field.replace('_', ' ').capitalize()}", f"| data{i} = {{{{{{{field}|}}}}}}"]
    lines += ["}}<noinclude>", "{{Documentation}}", "</noinclude>"]
    return "\n".join(lines)


def category_text(writer: Writer) -> str:
    plan = writer.plan
    return (f"This category lists articles about {_plural(plan.topic.noun)} in [[{plan.region}]].\n\n"
            f"{{{{Commons category|{plan.title[len('Category:'):]}}}}}\n\n"
            f"[[Category:{_plural(plan.topic.noun.split()[-1]).capitalize()} by region|{plan.region}]]")


def file_text(writer: Writer) -> str:
    rng, plan = writer.rng, writer.plan
    return ("== Summary ==\n{{Information\n"
            f"|description = {plan.name} {plan.topic.key}, photographed {rng.choice(PREPS)} {writer.link()}\n"
            f"|date = {rng.randint(2004, 2016)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}\n"
            f"|source = {{{{own}}}}\n|author = [[User:{rng.choice(writer.world.surnames)}]]\n}}}}\n\n"
            "== Licensing ==\n{{self|cc-by-sa-3.0}}")


TEXT_BY_KIND = {
    "article": article_text, "stub": stub_text, "redirect": redirect_text,
    "disambiguation": disambiguation_text, "template": template_text,
    "category": category_text, "file": file_text, "empty": lambda writer: "",
}

# ----------------------------------------------------------------------------------------------
# XML

SITEINFO = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" \
xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" \
xsi:schemaLocation="http://www.mediawiki.org/xml/export-0.10/ http://www.mediawiki.org/xml/export-0.10.xsd" \
version="0.10" xml:lang="en">
  <siteinfo>
    <sitename>Wikipedia</sitename>
    <dbname>enwiki</dbname>
    <base>https://en.wikipedia.org/wiki/Main_Page</base>
    <generator>MediaWiki 1.27.0-wmf.22 (gpt2ipu sample generator)</generator>
    <case>first-letter</case>
    <namespaces>
""" + "".join(
    f'      <namespace key="{key}" case="first-letter">{name}</namespace>\n' if name else
    f'      <namespace key="{key}" case="first-letter" />\n'
    for key, name in ((-2, "Media"), (-1, "Special"), (0, ""), (1, "Talk"), (2, "User"),
                      (3, "User talk"), (4, "Wikipedia"), (5, "Wikipedia talk"), (6, "File"),
                      (7, "File talk"), (8, "MediaWiki"), (9, "MediaWiki talk"), (10, "Template"),
                      (11, "Template talk"), (12, "Help"), (13, "Help talk"), (14, "Category"),
                      (15, "Category talk"), (100, "Portal"), (101, "Portal talk"), (118, "Draft"),
                      (119, "Draft talk"), (828, "Module"), (829, "Module talk"))
) + """    </namespaces>
  </siteinfo>
"""

_XML_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"})
EPOCH = dt.datetime(2004, 1, 1, tzinfo=dt.timezone.utc)


def _xml_escape(text: str) -> str:
    return text.translate(_XML_ESCAPES)


def mediawiki_sha1(text: str) -> str:
    """The revision sha1 of a MediaWiki dump: SHA-1 of the text in base 36, 31 digits."""
    value = int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16)
    digits = []
    while value:
        value, digit = divmod(value, 36)
        digits.append("0123456789abcdefghijklmnopqrstuvwxyz"[digit])
    return "".join(reversed(digits)).rjust(31, "0")


def page_xml(plan: PagePlan, text: str, rng: random.Random) -> str:
    page_id = 10 + plan.index * 3
    revision_id = 600_000_000 + plan.index * 977 + rng.randrange(977)
    timestamp = EPOCH + dt.timedelta(seconds=rng.randrange(12 * 365 * 86400))
    lines = ["  <page>", f"    <title>{_xml_escape(plan.title)}</title>", f"    <ns>{plan.ns}</ns>",
             f"    <id>{page_id}</id>"]
    if plan.kind == "redirect":
        lines.append(f'    <redirect title="{_xml_escape(plan.target)}" />')
    lines += ["    <revision>", f"      <id>{revision_id}</id>"]
    if rng.random() < 0.8:
        lines.append(f"      <parentid>{revision_id - rng.randint(1, 500_000)}</parentid>")
    lines += [f"      <timestamp>{timestamp.strftime('%Y-%m-%dT%H:%M:%SZ')}</timestamp>", "      <contributor>"]
    if rng.random() < 0.75:
        lines += [f"        <username>{rng.choice(FIRST_NAMES)}{rng.randint(1, 999)}</username>",
                  f"        <id>{rng.randint(1, 30_000_000)}</id>"]
    else:
        address = ".".join(str(rng.randint(1, 223)) for _ in range(4))
        lines.append(f"        <ip>{address}</ip>")
    lines.append("      </contributor>")
    if rng.random() < 0.6:
        comment = rng.choice(("copyedit", "added [[WP:RS|sources]]", "rv vandalism", "expand & tidy"))
        lines.append(f"      <comment>{_xml_escape(comment)}</comment>")
    lines += ["      <model>wikitext</model>", "      <format>text/x-wiki</format>"]
    size = len(text.encode("utf-8"))
    if text:
        lines.append(f'      <text bytes="{size}" xml:space="preserve">{_xml_escape(text)}</text>')
    else:
        lines.append('      <text bytes="0" xml:space="preserve" />')
    lines += [f"      <sha1>{mediawiki_sha1(text)}</sha1>", "    </revision>", "  </page>"]
    return "\n".join(lines) + "\n"


def render_page(world: World, plan: PagePlan, seed: int) -> tuple[str, str]:
    """(page XML, page text) of one planned page."""
    rng = random.Random(f"gpt2ipu-sample:{seed}:page:{plan.index}")
    text = TEXT_BY_KIND[plan.kind](Writer(world, plan, rng))
    return page_xml(plan, text, rng), text


# ----------------------------------------------------------------------------------------------
# Parts

def sample_part_names(parts: int) -> list[str]:
    if parts < 1:
        raise UserError(f"config key sample.parts must be at least 1 (got {parts})")
    return [f"part{i}" for i in range(1, parts + 1)]


def part_range(part: int, parts: int, pages: int) -> range:
    """Indices of the pages in part `part` (1-based) of `parts`: contiguous, sizes differ by <= 1."""
    return range((part - 1) * pages // parts, part * pages // parts)


def build_part_xml(*, part: int, parts: int, pages: int, seed: int) -> tuple[bytes, dict[str, int]]:
    """The uncompressed XML of one part and its counts per page kind."""
    world = World(pages, seed)
    chunks = [SITEINFO]
    kinds: dict[str, int] = {}
    words = 0
    for index in part_range(part, parts, pages):
        plan = world.plans[index]
        xml, text = render_page(world, plan, seed)
        chunks.append(xml)
        kinds[plan.kind] = kinds.get(plan.kind, 0) + 1
        words += len(text.split())
    chunks.append("</mediawiki>\n")
    return "".join(chunks).encode("utf-8"), {"kinds": kinds, "words": words}


def write_sample_part(out_dir: str | Path, *, part: int, parts: int, pages: int, seed: int) -> dict[str, Any]:
    """Write `<out_dir>/pages.xml.bz2` (part `part` of `parts`, 1-based) and provenance.json."""
    sample_part_names(parts)
    if not 1 <= part <= parts:
        raise UserError(f"part {part} is out of range: sample.parts is {parts}, so part must be 1..{parts}")
    if pages < parts:
        raise UserError(f"config key sample.pages ({pages}) must be at least sample.parts ({parts}), "
                        "so that every part has pages")
    start = time.perf_counter()
    xml, counts = build_part_xml(part=part, parts=parts, pages=pages, seed=seed)
    # A fixed level and no header timestamp in bz2: the same arguments give the same bytes.
    data = bz2.compress(xml, BZ2_LEVEL)
    pages_in_part = len(part_range(part, parts, pages))
    figures = {"pages": pages_in_part, "page_kinds": counts["kinds"], "wikitext_words": counts["words"],
               "xml_bytes": len(xml), "bz2_bytes": len(data),
               "seconds": round(time.perf_counter() - start, 3)}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / PAGES_NAME).write_bytes(data)
        write_provenance(tmp, "dump", {"dataset": "sample", "part": part, "parts": parts,
                                       "pages": pages, "seed": seed}, [], figures)
    return {"path": str(out_dir / PAGES_NAME), **figures}
