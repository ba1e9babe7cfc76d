"""Continual-forgetting metrics of GS-LoRA (arXiv 2403.11530 / 2501.09705) as an `evaluate` module.

    import evaluate
    metric = evaluate.load("evaluation/metrics/forgetting")
    metric.compute(predictions=[...], references=[...], forget_classes=[3, 4], old_classes=[7],
                   forget_accuracy_before=0.9)
    # {"acc_f": ..., "acc_r": ..., "acc_o": ..., "drop": ..., "h_mean": ...}

Acc_f: accuracy on the classes forgotten in this task; Acc_o: on classes forgotten in earlier tasks; Acc_r: on all
other classes; Drop = forget_accuracy_before - Acc_f; H-Mean = 2 Drop Acc_r / (Drop + Acc_r). Fractions in [0, 1];
an accuracy over no examples (or Drop / H-Mean without `forget_accuracy_before`) is None.
"""

import datasets
import evaluate

from hfpapers import get_method
from hfpapers.methods.gs_lora.metrics import forgetting_metrics

_CITATION = get_method("gs-lora").bibtex


_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): true class ids.
    forget_classes (list of int): the classes forgotten in this task.
    old_classes (list of int, optional): classes forgotten in earlier tasks.
    forget_accuracy_before (float, optional): Acc_f of the model before this task, for Drop and H-Mean.
Returns:
    acc_f, acc_r, acc_o, drop, h_mean (float or None).
"""


@evaluate.utils.file_utils.add_start_docstrings(__doc__, _KWARGS_DESCRIPTION)
class Forgetting(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
            reference_urls=["https://github.com/bjzhb666/GS-LoRA"],
        )

    def _compute(self, predictions, references, forget_classes, old_classes=(), forget_accuracy_before=None):
        return forgetting_metrics(predictions, references, forget_classes, old_classes or (), forget_accuracy_before)
