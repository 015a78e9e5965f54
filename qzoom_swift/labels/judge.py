"""The LLM judge of stage 2 (and optionally stage 3): are answers A and B right, given the reference?

The prompt is the authors' own, verbatim: the system and user turns printed in the release's
``qwen_src/README.md`` ("LLM-as-a-Judge", the document that follows the paper's naming), with its
markdown, line breaks and ``A: [Yes/No]`` / ``B: [Yes/No]`` answer format. The judge scripts themselves
were not released, so this is the text, not code, that is matched. Judges are small local models and their
output is messy, so parsing is lenient (case, spacing, brackets, punctuation, extra text) and never raises:
a verdict it cannot find is ``None`` ("unknown") and the caller counts it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

JUDGE_SYSTEM = "You are a fair and robust evaluator. You focus on semantic correctness over strict string matching."
"""The system turn, verbatim from the release's ``qwen_src/README.md``."""
JUDGE_TEMPLATE = """You are an intelligent evaluator for a Visual Question Answering task.
Compare the Model Predictions against the Ground Truth.

--- DATA ---
Question: {question}
Ground Truth: {reference}
Model A Prediction: {answer_a}
Model B Prediction: {answer_b}

--- CRITERIA ---
1. **Containment**: If the Ground Truth is a short value (e.g., '6000') and the
   Model Prediction contains it correctly within a sentence (e.g., 'The value is
   6000'), mark it as **Yes**.
2. **Synonyms**: Accept standard synonyms (e.g., 'Yes' = 'True', '10%' = '0.1').
3. **Formatting**: Ignore punctuation or capitalization differences (e.g., 'april' = 'April').
4. **Contradiction**: Only mark 'No' if the prediction is factually wrong or
   missing the key information.

--- TASK ---
Does Model A provide the correct answer? (Yes/No)
Does Model B provide the correct answer? (Yes/No)

Respond in this exact format:
A: [Yes/No]
B: [Yes/No]"""
"""The user turn, verbatim from the release's ``qwen_src/README.md``: Model A is the base (low-resolution)
answer, Model B the RoI answer in stage-2 mining."""
_VERDICT = re.compile(r"(?i)(?<![\w])(?:candidate\s+|answer\s+)?([ab])(?![\w])[\s*)\]]*[:=\-][\s*\[]*"
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
    """``A: Yes`` / ``B: [No]`` (any case, markdown, brackets, extra prose); the first verdict per letter wins."""
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
        from qzoom_swift.extras import require_extra

        require_extra("swift", "the judge model (served by ms-swift's TransformersEngine)")
        from swift.infer_engine import RequestConfig, TransformersEngine

        self.engine = TransformersEngine(model, model_type=model_type, max_batch_size=max_batch_size)
        self.config = RequestConfig(max_tokens=max_tokens, temperature=0)

    def __call__(self, items: list[tuple[str, str, str, str]]) -> list[Verdict]:
        """Verdicts for (question, reference, answer A, answer B) tuples."""
        from swift.infer_engine import InferRequest

        requests = [InferRequest(messages=judge_prompt(*item)) for item in items]
        responses = self.engine.infer(requests, self.config, use_tqdm=False)
        return [parse_judgement(r.choices[0].message.content if r is not None else "") for r in responses]
