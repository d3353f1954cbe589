"""The demo's prompt: a long, plain document with one fact in the middle, and a question about it."""

from __future__ import annotations

import random

DEMO_QUESTION = "According to the document, from which city will the Aurora project launch?"
DEMO_FACT = "Important: the Aurora project will launch from Reykjavik, in the spring."

_TOPICS = ["storage", "routing", "billing", "support", "security", "logging", "backups", "pricing"]
_SENTENCES = [
    "The {t} team reviewed the quarterly plan and agreed to keep the current schedule.",
    "Most customers asked for better documentation of the {t} features.",
    "A new dashboard for {t} will be shipped after the next internal review.",
    "The {t} service handled more requests this month than in any month before.",
    "Engineers on the {t} rotation wrote a short report about the incidents of the week.",
    "The {t} budget stays the same, and no new hires are planned for now.",
    "Feedback from the pilot users of {t} was mostly positive, with a few requests for speed.",
]


def demo_document(paragraphs: int = 24, seed: int = 7) -> str:
    """About 1.6k tokens of meeting notes, deterministic, with :data:`DEMO_FACT` near the middle."""
    rng = random.Random(seed)
    out = []
    for i in range(paragraphs):
        topic = rng.choice(_TOPICS)
        sentences = [s.format(t=topic) for s in rng.sample(_SENTENCES, 4)]
        out.append(f"Section {i + 1}. " + " ".join(sentences))
        if i == paragraphs // 2:
            out.append(DEMO_FACT)
    return "\n".join(out)
