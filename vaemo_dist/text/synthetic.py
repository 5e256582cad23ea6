"""Templated affective descriptions of the synthetic corpus, derived from each clip's hidden class.

They stand in for an MLLM's descriptions in CPU tests and the default stage-2 run: the same record
fields as `vaemo-describe` produces, with varied wording (synonyms, cue phrases, sentence frames and
an intensity drawn per clip) so that no two clips of a class need share a sentence.
"""

from __future__ import annotations

import random
from typing import Any

PROMPT_VERSION = "synthetic-template-v1"
MODEL = "template"

# Per class: emotion words (the first is the canonical name), facial cues, vocal cues.
LEXICON: dict[str, tuple[list[str], list[str], list[str]]] = {
    "neutral": (
        ["neutral", "composed", "expressionless", "impassive"],
        ["a still face with relaxed features", "an even gaze and a closed, level mouth",
         "slack cheeks and unmoving brows"],
        ["a flat, even voice", "a level tone with little variation in pitch",
         "a steady, unemphatic delivery"],
    ),
    "happy": (
        ["happy", "joyful", "cheerful", "delighted"],
        ["a broad smile with raised cheeks", "bright eyes and upturned mouth corners",
         "a grin that keeps widening"],
        ["a bright, lively voice", "an upbeat tone with rising pitch",
         "quick, bouncy speech with laughter in it"],
    ),
    "sad": (
        ["sad", "sorrowful", "downcast", "unhappy"],
        ["drooping eyelids and a downturned mouth", "a lowered gaze and inner brows drawn up",
         "a slack face that looks tired"],
        ["a low, slow, quiet voice", "a soft, heavy tone that trails off", "halting speech with long pauses"],
    ),
    "angry": (
        ["angry", "furious", "irritated", "enraged"],
        ["furrowed brows and a tight jaw", "a glaring stare and pressed lips",
         "flared nostrils and a tense face"],
        ["a loud, harsh voice", "a sharp, forceful tone", "fast, clipped speech with stressed words"],
    ),
    "fearful": (
        ["fearful", "scared", "frightened", "anxious"],
        ["wide eyes and raised, drawn-together brows", "a stretched mouth and a face pulled back",
         "darting eyes and a tense forehead"],
        ["a high, trembling voice", "fast, breathy speech", "a shaky tone that rises at the ends"],
    ),
    "surprised": (
        ["surprised", "astonished", "amazed", "startled"],
        ["raised brows and a dropped jaw", "wide-open eyes and an open mouth",
         "a sudden lift of the whole face"],
        ["a sudden high exclamation", "a sharp rise in pitch", "a quick gasp before speaking"],
    ),
    "disgusted": (
        ["disgusted", "repulsed", "revolted", "averse"],
        ["a wrinkled nose and raised upper lip", "a face turned slightly away with narrowed eyes",
         "a curled lip and lowered brows"],
        ["a low, grating voice", "a drawn-out, contemptuous tone", "short words pushed out with effort"],
    ),
    "calm": (
        ["calm", "serene", "peaceful", "relaxed"],
        ["soft eyes and a faint, easy smile", "a loose jaw and smooth forehead",
         "gentle, unhurried head movement"],
        ["a soft, steady voice", "slow, warm speech", "an unhurried, even rhythm"],
    ),
}
INTENSITY = {"low": ("slightly", "mild"), "medium": ("clearly", "moderate"), "high": ("very", "strong")}
AGREEMENT = ["The face and the voice agree.", "Facial and vocal cues point the same way.",
             "Both channels are consistent with each other."]
FRAMES = [
    "The person looks and sounds {adv} {word}: {face}, and {voice}.",
    "A {adj} {word} expression: {face}, with {voice}.",
    "The speaker seems {adv} {word}, showing {face} and speaking in {voice}.",
    "{Face}, together with {voice}, shows that the person is {adv} {word}.",
    "Someone {adv} {word}, with {face}; they speak in {voice}.",
]


def _lexicon(name: str) -> tuple[list[str], list[str], list[str]]:
    if name in LEXICON:
        return LEXICON[name]
    # An unnamed class of a larger corpus: still distinct text per class, if less natural.
    return ([f"{name} emotion"], [f"the facial cues of {name}"], [f"the vocal cues of {name}"])


def describe_synthetic_clip(key: str, meta: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """A description record for one synthetic clip (its json metadata: label, class_name, seed)."""
    name = str(meta.get("class_name") or f"class-{meta.get('label', '?')}")
    # The clip's own seed differs between corpora with equal keys, so wording differs too.
    rng = random.Random(f"{seed}:{key}:{meta.get('seed', '')}")
    words, faces, voices = _lexicon(name)
    word, face, voice = rng.choice(words), rng.choice(faces), rng.choice(voices)
    intensity = rng.choice(list(INTENSITY))
    adv, adj = INTENSITY[intensity]
    text = rng.choice(FRAMES).format(adv=adv, adj=adj, word=word, face=face, Face=face[0].upper() + face[1:],
                                     voice=voice)
    return {
        "key": key,
        "status": "ok",
        "description": text,
        "emotion": words[0],
        "intensity": intensity,
        "reasoning": {"facial": f"{face[0].upper() + face[1:]}.", "vocal": f"{voice[0].upper() + voice[1:]}.",
                      "agreement": rng.choice(AGREEMENT)},
        "prompt_version": PROMPT_VERSION,
        "model": MODEL,
        "attempts": 0,
    }


def class_prompts(name: str) -> list[str]:
    """Plain sentences naming one class, for zero-shot classification with the text embeddings."""
    out = []
    for word in _lexicon(name)[0]:
        article = "An" if word[0] in "aeiou" else "A"
        out += [f"A person who looks and sounds {word}.", f"{article} {word} face and voice."]
    return out
