"""The LLM judge of stage 2 (and optionally stage 3): are answers A and B right, given the reference?

The prompt carries what the paper's appendix asks of the judge, in our words: a fair and robust evaluator
that values meaning over string matching, four criteria (containment, equivalent forms, punctuation and
case ignored, "No" only for a wrong or incomplete answer), the question, the ground truth, Model A's (base)
and Model B's (RoI) predictions, and exactly two lines back, ``A: Yes/No`` and ``B: Yes/No``. Judges are
small local models and their output is messy, so parsing is lenient (case, spacing, punctuation, extra
text) and never raises: a verdict it cannot find is ``None`` ("unknown") and the caller counts it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

JUDGE_SYSTEM = (
    "You are a fair and robust evaluator of answers to questions about images. Judge whether each "
    "prediction means the same as the ground truth: semantic correctness matters, exact string matching "
    "does not."
)
JUDGE_CRITERIA = (
    "1. Containment: a prediction that states the ground truth correctly inside a longer sentence is "
    "correct (the ground truth is often a single word or number).",
    "2. Equivalents: standard synonyms and equivalent forms count as the same answer (for example "
    "\"Yes\" and \"True\", or \"10%\" and \"0.1\").",
    "3. Form: ignore punctuation and capitalisation.",
    "4. Say No only when the prediction is factually wrong or leaves out the key information the "
    "question asks for.",
)
"""The four criteria of the paper's judge prompt (appendix), in our words."""
JUDGE_TEMPLATE = (
    "Question: {question}\n"
    "Ground truth: {reference}\n"
    "Model A prediction: {answer_a}\n"
    "Model B prediction: {answer_b}\n\n"
    "Decide for each model whether its prediction is correct, using these criteria:\n"
    + "\n".join(JUDGE_CRITERIA) + "\n\n"
    "Reply with exactly two lines and nothing else:\n"
    "A: Yes or No\n"
    "B: Yes or No"
)
"""The user turn: Model A is the base (low-resolution) answer, Model B the RoI answer in stage-2 mining."""
_VERDICT = re.compile(r"(?i)(?<![\w])(?:candidate\s+|answer\s+)?([ab])(?![\w])[\s*)\]]*[:=\-]\s*\**\s*"
                      r"(yes|no|correct|incorrect|right|wrong|true|false)\b")
_POSITIVE = {"yes", "correct", "right", "true"}


@dataclass(frozen=True)
class Verdict:
    a: bool | None
    b: bool | None
    raw: str = ""

    @property
    def complete(self) -> bool:
        return self.a is not None and self.b is not None


def parse_judgement(text: str | None) -> Verdict:
    """``A: Yes`` / ``B: No`` (any case, markdown, extra prose); the first verdict per letter wins."""
    found: dict[str, bool] = {}
    for letter, word in _VERDICT.findall(text or ""):
        found.setdefault(letter.lower(), word.lower() in _POSITIVE)
    return Verdict(found.get("a"), found.get("b"), text or "")


def judge_prompt(question: str, reference: str, answer_a: str, answer_b: str) -> list[dict]:
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_TEMPLATE.format(question=question, reference=reference,
                                                              answer_a=answer_a or "(empty)",
                                                              answer_b=answer_b or "(empty)")}]


class LLMJudge:
    """A local model behind ms-swift's TransformersEngine (any model swift can load)."""

    def __init__(self, model: str, model_type: str | None = None, max_batch_size: int = 8, max_tokens: int = 16):
        from swift.infer_engine import RequestConfig, TransformersEngine

        self.engine = TransformersEngine(model, model_type=model_type, max_batch_size=max_batch_size)
        self.config = RequestConfig(max_tokens=max_tokens, temperature=0)

    def __call__(self, items: list[tuple[str, str, str, str]]) -> list[Verdict]:
        """Verdicts for (question, reference, answer A, answer B) tuples."""
        from swift.infer_engine import InferRequest

        requests = [InferRequest(messages=judge_prompt(*item)) for item in items]
        responses = self.engine.infer(requests, self.config, use_tqdm=False)
        return [parse_judgement(r.choices[0].message.content if r is not None else "") for r in responses]
