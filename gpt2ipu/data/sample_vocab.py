"""The embedded sample's vocabulary: topics with their words, and the shared words of its prose grammar.

Data for gpt2ipu/data/sample_dump.py, kept apart so the generator's code reads on its own.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topic:
    key: str
    noun: str                 # what the lead sentence says the subject is
    title: str                # article title pattern over {name}
    short: str                # how prose refers back to the subject
    greek: str                # the topic noun in Greek, for the lead's gloss
    cjk: str                  # ... and in Japanese
    category: str             # category pattern over {region}
    adjectives: tuple[str, ...]
    nouns: tuple[str, ...]
    verbs: tuple[str, ...]    # transitive, past tense
    sections: tuple[str, ...]
    infobox: tuple[tuple[str, str], ...]   # (field, kind of value)


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


TOPICS = (
    Topic("river", "river", "{name} River", "the {name}", "ποταμός", "川", "Rivers of {region}",
          _words("long shallow wide navigable seasonal fast cold muddy winding northern southern"),
          _words("valley basin delta tributary bank bridge dam flood channel mill estuary lake "
                 "source mouth rapids fishery canal"),
          _words("drained crossed joined fed flooded carved reached supplied bordered irrigated"),
          ("Course", "Geography", "Hydrology", "History", "Ecology", "Economy"),
          (("name", "name"), ("country", "region"), ("length_km", "number"),
           ("source1", "place"), ("mouth", "place"), ("basin_size_km2", "number"))),
    Topic("town", "town", "{name}", "{name}", "πόλη", "町", "Populated places in {region}",
          _words("small historic coastal rural industrial ancient busy quiet prosperous fortified"),
          _words("market church square harbour railway castle council school mill fair district "
                 "population museum station wall guild"),
          _words("built founded governed hosted expanded rebuilt attracted defended annexed served"),
          ("History", "Geography", "Demographics", "Economy", "Culture", "Transport"),
          (("name", "name"), ("country", "region"), ("population_total", "number"),
           ("established_date", "year"), ("leader_name", "person"), ("area_km2", "number"))),
    Topic("mountain", "mountain", "Mount {name}", "the mountain", "όρος", "山", "Mountains of {region}",
          _words("high steep rocky snowy volcanic remote glaciated forested jagged isolated"),
          _words("summit ridge glacier slope pass peak cliff trail hut route ascent valley forest "
                 "snowfield crater"),
          _words("climbed surveyed crossed named mapped reached explored dominated overlooked formed"),
          ("Geography", "Geology", "Climbing history", "Climate", "Flora and fauna"),
          (("name", "name"), ("elevation_m", "number"), ("prominence_m", "number"),
           ("range", "region"), ("first_ascent", "year"), ("easiest_route", "word"))),
    Topic("scientist", "scientist", "{name}", "{last}", "επιστήμονας", "科学者", "Scientists from {region}",
          _words("influential careful prolific young celebrated controversial patient brilliant "
                 "modest pioneering"),
          _words("theory experiment laboratory paper journal student lecture instrument method "
                 "prize society university observation model equation"),
          _words("published measured proposed discovered tested described studied founded "
                 "challenged improved"),
          ("Early life", "Education", "Career", "Research", "Later life", "Legacy"),
          (("name", "name"), ("birth_date", "birth"), ("birth_place", "place"),
           ("fields", "word"), ("alma_mater", "place"), ("known_for", "word"))),
    Topic("album", "album", "{name} (album)", "''{name}''", "δίσκος", "音楽", "{region} albums",
          _words("debut acoustic experimental live acclaimed melancholic loud second final "
                 "ambitious"),
          _words("song single track chorus guitar drum record label tour producer studio melody "
                 "lyric chart band"),
          _words("recorded released produced toured wrote promoted sampled performed mixed "
                 "reissued"),
          ("Background", "Recording", "Release", "Reception", "Track listing", "Personnel"),
          (("name", "name"), ("type", "word"), ("artist", "person"), ("released", "year"),
           ("studio", "place"), ("label", "word"))),
    Topic("ship", "ship", "SS {name}", "the ''{name}''", "πλοίο", "船", "Ships built in {region}",
          _words("steel wooden fast heavy armed merchant coastal large refitted ageing"),
          _words("hull deck engine crew cargo voyage harbour convoy captain mast boiler cabin "
                 "anchor port shipyard"),
          _words("carried sailed launched escorted rescued towed sank captured repaired "
                 "transported"),
          ("Construction", "Service history", "Wartime service", "Fate", "Legacy"),
          (("ship_name", "name"), ("ship_builder", "place"), ("ship_launched", "year"),
           ("ship_tonnage", "number"), ("ship_length", "number"), ("ship_fate", "word"))),
    Topic("beetle", "species of beetle", "{name} beetle", "the {name} beetle", "σκαθάρι", "甲虫",
          "Beetles of {region}",
          _words("small black shiny nocturnal rare common striped native invasive tiny"),
          _words("larva wing leaf forest habitat egg antenna shell predator bark soil meadow "
                 "colony season specimen"),
          _words("ate laid inhabited avoided attacked colonised damaged pollinated hid "
                 "resembled"),
          ("Taxonomy", "Description", "Distribution", "Behaviour", "Conservation"),
          (("name", "name"), ("regnum", "word"), ("ordo", "word"), ("familia", "word"),
           ("authority", "person"), ("range_map", "place"))),
    Topic("club", "football club", "{name} F.C.", "the club", "ποδοσφαιρικός σύλλογος", "サッカー",
          "Football clubs in {region}",
          _words("professional amateur local successful relegated promoted historic rival "
                 "young wealthy"),
          _words("stadium league cup season manager player match goal title derby supporter "
                 "academy kit crowd trophy"),
          _words("won lost signed hosted defeated joined reached played sold appointed"),
          ("History", "Stadium", "Players", "Honours", "Supporters", "Rivalries"),
          (("clubname", "name"), ("founded", "year"), ("ground", "place"),
           ("capacity", "number"), ("manager", "person"), ("league", "region"))),
)

CONNECTORS = _words("However, Later, Meanwhile, Eventually, Afterwards, Nevertheless, "
                    "Subsequently, Initially,")
ADVERBS = _words("notably widely largely mostly rarely briefly slowly often partly generally")
COPULA_ADJ = _words("important famous unusual popular difficult significant visible typical "
                    "large well-known")
PREPS = ("in", "near", "across", "beyond", "around", "along")
ORDINALS = ("fifteenth", "sixteenth", "seventeenth", "eighteenth", "nineteenth", "twentieth")
GENERIC_NOUNS = _words("region government war report record history survey people period "
                       "century border community visitor")
FIRST_NAMES = ("Anna", "José", "Zoë", "Erik", "Maria", "Jonas", "Chloé", "Søren", "Ingrid",
               "Luis", "Hélène", "Tomás", "Ada", "Björn", "Clara", "Dmitri", "Élodie", "Felix",
               "Greta", "Hugo", "Irene", "Jakob", "Kenji", "Lena", "Mateo", "Nora", "Oskar",
               "Paula", "Rafael", "Sofia", "Yuki", "Zofia")
ONSETS = _words("b br d dr f g gr k kr l m n p pr r s st t tr v z th h")
VOWELS = _words("a e i o u a e o ai ou ei")
ACCENTED_VOWELS = ("é", "á", "ö", "ü", "ø", "å", "ã", "í")
CODAS = ("n", "r", "l", "s", "th", "nd", "rk")
GREEK_LETTERS = str.maketrans("abdefghiklmnoprstuvxz", "αβδεφγηικλμνοπρστυβξζ")
PUBLISHERS = ("The Northern Gazette", "Regional Survey Office", "Historical Society Press",
              "University Review", "Κεντρική Εφημερίδα", "東洋新聞")

# ----------------------------------------------------------------------------------------------
# The plan: every page's kind and title, from (seed, pages) alone, so links, redirects and
# disambiguation pages can point at pages in other parts.

# One block of page kinds, reshuffled per block: every run of 40 pages has each kind, about
# three quarters are articles, and the rest have the real dump's proportions only roughly.
