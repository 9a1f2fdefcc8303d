"""The chat messages of the explainer and the two scorers, and the parsing of their answers.

The method is delphi's (EleutherAI): explain a feature from its top and interval examples with the activating tokens
marked; then, given only the explanation, the model says which excerpts of a shuffled batch activate (detection), or
which excerpts have the right tokens marked (fuzzing). Each prompt opens with a worked example as an earlier turn of
the chat: a small local model keeps to the answer format that way, where an instruction alone does not."""
from __future__ import annotations

import re

PROMPT_VERSION = 2  # part of the label cache's key: a change of wording must not reuse old answers
POLYSEMANTIC = "POLYSEMANTIC"

EXPLAIN_SYSTEM = (
    "You explain what a feature of a language model detects. You see text excerpts where it is active; the tokens "
    "where it is active are marked <<like this>>. Reply with one short phrase (a few words) naming what the marked "
    f"tokens have in common, after 'Explanation:'. If they have nothing in common, reply 'Explanation: {POLYSEMANTIC}'.")
EXPLAIN_SHOT = ("Excerpts:\n1. I bought <<three>> apples at the market\n2. it took <<two>> hours to get there\n"
                "3. about <<five>> of them were broken\nWhat do the marked tokens have in common?",
                "Explanation: small numbers written as words")

DETECTION_SYSTEM = (
    "You check a feature explanation against text excerpts. For each numbered excerpt answer 1 if the explanation "
    "applies to some token in it, else 0. Reply with the list only, one number per excerpt, like [1, 0].")
# Worked examples with as many excerpts as the real question where that is one: shown a two-excerpt example, a small
# model answers a one-excerpt question with a two-item list.
DETECTION_SHOTS_ONE = (
    ("Explanation: small numbers written as words\n1. I bought three apples", "[1]"),
    ("Explanation: words about water\n1. he opened the door slowly", "[0]"),
)
DETECTION_SHOTS = (
    ("Explanation: small numbers written as words\n1. I bought three apples\n2. he opened the door slowly\n"
     "3. about five of them", "[1, 0, 1]"),
)

FUZZING_SYSTEM = (
    "You check a feature explanation against text excerpts in which some tokens are marked <<like this>>. For each "
    "numbered excerpt answer 1 if the marked tokens are ones the explanation describes, else 0. Reply with the list "
    "only, one number per excerpt, like [1, 0].")
FUZZING_SHOTS_ONE = (
    ("Explanation: small numbers written as words\n1. I bought <<three>> apples", "[1]"),
    ("Explanation: small numbers written as words\n1. he <<opened>> the door", "[0]"),
)
FUZZING_SHOTS = (
    ("Explanation: small numbers written as words\n1. I bought <<three>> apples\n2. he <<opened>> the door\n"
     "3. about <<five>> of them", "[1, 0, 1]"),
)


def _chat(system: str, shots, user: str) -> list[dict]:
    messages = [{"role": "system", "content": system}]
    for question, answer in shots:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": user})
    return messages


def numbered(texts: list[str]) -> str:
    return "\n".join(f"{i + 1}. {t}" for i, t in enumerate(texts))


def explanation_messages(marked_excerpts: list[str]) -> list[dict]:
    return _chat(EXPLAIN_SYSTEM, [EXPLAIN_SHOT], "Excerpts:\n" + numbered(marked_excerpts)
                 + "\nWhat do the marked tokens have in common?")


def detection_messages(explanation: str, excerpts: list[str]) -> list[dict]:
    shots = DETECTION_SHOTS_ONE if len(excerpts) == 1 else DETECTION_SHOTS
    return _chat(DETECTION_SYSTEM, shots, f"Explanation: {explanation}\n" + numbered(excerpts))


def fuzzing_messages(explanation: str, marked_excerpts: list[str]) -> list[dict]:
    shots = FUZZING_SHOTS_ONE if len(marked_excerpts) == 1 else FUZZING_SHOTS
    return _chat(FUZZING_SYSTEM, shots, f"Explanation: {explanation}\n" + numbered(marked_excerpts))


_LABEL = re.compile(r"explanation\s*:\s*", re.IGNORECASE)
MAX_EXPLANATION_CHARS = 200


def parse_explanation(answer: str | None) -> tuple[str, str]:
    """(explanation, status): status "ok", "polysemantic" (the model said so) or "empty" (nothing usable). The text
    after the last 'Explanation:' if there is one, else the whole answer; its first line, unquoted."""
    text = (answer or "").strip()
    found = list(_LABEL.finditer(text))
    if found:
        text = text[found[-1].end():]
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = line.strip(" \"'`*.").strip()[:MAX_EXPLANATION_CHARS]
    if not line:
        return "", "empty"
    if re.fullmatch(r"[\W_]*polysemantic[\W_]*", line, re.IGNORECASE):
        return POLYSEMANTIC, "polysemantic"
    return line, "ok"


_LIST = re.compile(r"\[([^\[\]]*)\]")
_TRUE = {"1", "yes", "true"}
_FALSE = {"0", "no", "false"}


def parse_answers(answer: str | None, n: int) -> list[int] | None:
    """The 0/1 list of a scorer's answer for `n` excerpts, or None when the answer is malformed: no bracketed list,
    one of the wrong length, or an entry that is not 0/1 (yes/no, true/false). A one-excerpt batch may also be
    answered with the bare word."""
    text = (answer or "").strip()
    match = _LIST.search(text)
    if match is None:
        if n == 1 and text.split() and text.split()[0].strip(".,").lower() in _TRUE | _FALSE:
            return [1 if text.split()[0].strip(".,").lower() in _TRUE else 0]
        return None
    items = [t.strip().strip("'\"").lower() for t in match.group(1).split(",") if t.strip()]
    if len(items) != n or any(t not in _TRUE | _FALSE for t in items):
        return None
    return [1 if t in _TRUE else 0 for t in items]
