"""BLEU that works offline: evaluate's sacrebleu metric when it loads, else the sacrebleu package directly.

``evaluate.load("sacrebleu")`` downloads the metric script from the hub, so it fails without internet.
evaluate's script itself calls ``sacrebleu.corpus_bleu(predictions, references)`` with sacrebleu's defaults
(13a tokenisation, exponential smoothing, case-sensitive), which is what the fallback calls: same number.
A metric script on disk (``--bleu_metric ./metrics/sacrebleu``) loads offline through evaluate as well.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

logger = logging.getLogger("hf_adamp.examples")


class Bleu:
    """Corpus BLEU with one reference per sentence. ``route`` says which implementation computes it."""

    def __init__(self, metric: str = "sacrebleu"):
        self._metric = None
        try:
            import evaluate

            self._metric = evaluate.load(metric)
            self.route = f"evaluate.load({metric!r})"
        except Exception as err:  # offline, or no such script: the sacrebleu package gives the same score
            self.route = "sacrebleu.corpus_bleu"
            logger.warning(
                "evaluate.load(%r) failed (%s: %s); computing BLEU with the sacrebleu package",
                metric,
                type(err).__name__,
                str(err)[:200],
            )
            try:
                import sacrebleu  # noqa: F401
            except ImportError:
                raise ImportError("BLEU needs the sacrebleu package: pip install sacrebleu") from err

    def __call__(self, predictions: Sequence[str], references: Sequence[str]) -> float:
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        if self._metric is not None:
            result = self._metric.compute(predictions=list(predictions), references=[[r] for r in references])
            return float(result["score"])
        import sacrebleu

        return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)
