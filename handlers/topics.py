"""Topic extraction: which subjects a post is about.

Explicit topics are the author's own labels (hashtags, Stack Exchange-style tags) and carry
full weight. Implicit topics are keywords from the text: English words minus stop words, and
Chinese text segmented into words with jieba (a dictionary-based segmenter, not n-grams).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass

EXPLICIT_WEIGHT = 1.0
IMPLICIT_WEIGHT = 0.25
MAX_KEYWORDS_PER_POST = 5
# Keywords come from the start of long posts only, which bounds the cost per post.
KEYWORD_TEXT_CHARS = 2000

_LATIN_WORD = re.compile(r"[a-z][a-z0-9+#'-]{2,31}")
_HAN_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_URL = re.compile(r"https?://\S+|www\.\S+")

# Common English function words plus words that carry no subject in social posts.
STOP_WORDS = frozenset(
    """
    a about above after again against all also am an and any are aren't as at be because been
    before being below between both but by can can't cannot could couldn't did didn't do does
    doesn't doing don't down during each few for from further get gets got had hadn't has hasn't
    have haven't having he her here hers herself him himself his how however i if in into is
    isn't it it's its itself just know let like make many may me might more most much must my
    myself need new no nor not now of off on once one only or other ought our ours ourselves out
    over own really same say says see seem seems she should shouldn't since so some such than
    that that's the their theirs them themselves then there there's these they thing things
    think this those though through thus to too two under until up upon us use used using very
    want was wasn't way we well were weren't what when where whether which while who whom why
    will with without won't would wouldn't yes yet you your yours yourself yourselves
    question answer answers questions thanks thank please anyone example does get 's
    """.split()
)
_HAN_STOP_WORDS = frozenset("的 了 是 在 我 有 和 就 不 人 都 一 一个 上 也 很 到 说 要 去 你 会 着 没有 看 好 自己 这 那 他 她 它 们 我们 你们 他们 吗 吧 呢 啊".split())


@dataclass(frozen=True, slots=True)
class TopicSignal:
    topic: str
    weight: float
    # True for the author's own labels (tags, hashtags), False for keywords of the text.
    explicit: bool = False


def normalize_topic(label: str) -> str:
    """Lower-case a label and join its words with '-', so '#QuantumComputing' and
    'quantumcomputing' become one topic."""
    return re.sub(r"\s+", "-", label.strip().lstrip("#").casefold())[:100]


def extract_topics(text: str, hashtags: tuple[str, ...] = (), tags: tuple[str, ...] = ()) -> list[TopicSignal]:
    """Return the post's topics, explicit labels first, each topic once."""
    signals: dict[str, TopicSignal] = {}
    for label in (*tags, *hashtags):
        topic = normalize_topic(label)
        if topic:
            signals[topic] = TopicSignal(topic, EXPLICIT_WEIGHT, explicit=True)
    for keyword in extract_keywords(text):
        signals.setdefault(keyword, TopicSignal(keyword, IMPLICIT_WEIGHT))
    return list(signals.values())


def extract_keywords(text: str, limit: int = MAX_KEYWORDS_PER_POST) -> list[str]:
    """Return up to `limit` keywords of `text`, most frequent first."""
    text = _URL.sub(" ", text[:KEYWORD_TEXT_CHARS].casefold())
    counts: Counter[str] = Counter()
    for word in _LATIN_WORD.findall(text):
        word = word.strip("'-")
        if len(word) >= 3 and word not in STOP_WORDS and not word.isdigit():
            counts[word] += 1
    for run in _HAN_RUN.findall(text):
        for word in _segment_chinese(run):
            if len(word) >= 2 and word not in _HAN_STOP_WORDS:
                counts[word] += 1
    return [word for word, _ in counts.most_common(limit)]


_jieba = None


def _segment_chinese(run: str) -> list[str]:
    global _jieba
    if _jieba is None:
        import jieba

        jieba.setLogLevel(logging.WARNING)
        _jieba = jieba
    return _jieba.lcut(run)
