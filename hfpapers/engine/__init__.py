"""The one Accelerate training engine every method uses.

- `arguments.py`  `TrainingArguments` (checked when made)
- `state.py`      `TrainingState` (passed to the recipe's loss and to callbacks) and `Callback`
- `recipe.py`     `Recipe`, `ImageClassificationRecipe`, `TensorDataset`: how a method trains
- `loop.py`       `fit` and `evaluate`: the loop, under `python`, `hfpapers train` and `accelerate launch`
- `run_folder.py` what a run writes (metrics, curves, results, run file) and its pickle-free checkpoints
- `entrypoints.py` `train` / `evaluate_folder`: a registered method end to end; `warm_start`: an earlier stage
"""

from .arguments import TrainingArguments
from .entrypoints import evaluate_folder, train, warm_start
from .loop import FitResult, NonFiniteLossError, evaluate, fit
from .recipe import ImageClassificationRecipe, Recipe, TensorDataset
from .run_folder import CURVES_FILE, METRICS_FILE, RESULTS_FILE, RUN_FILE, STATE_FILE, plot_curves
from .state import Callback, TrainingState, process_state

__all__ = ["CURVES_FILE", "METRICS_FILE", "RESULTS_FILE", "RUN_FILE", "STATE_FILE", "Callback", "FitResult",
           "ImageClassificationRecipe", "NonFiniteLossError", "Recipe", "TensorDataset", "TrainingArguments",
           "TrainingState", "evaluate", "evaluate_folder", "fit", "plot_curves", "process_state", "train",
           "warm_start"]
